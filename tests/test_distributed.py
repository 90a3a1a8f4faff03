"""Data-parallel calibration: two CPU ranks under torchrun (gloo) against the single-process computation.

The worker script (below) runs under ``python3 -m torch.distributed.run --standalone --nproc_per_node=2``; each
rank scores its shard, saves the all-reduced per-parameter scores and its pruned model; the test recomputes
everything in one process on the union of the shards and compares.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import obafx
from obafx.distributed import all_reduce_scores, distributed_importance, local_parameter_scores, shard
from obafx.passes.criteria import fisher_scores, taylor_scores
from obafx.passes.hvp import parameter_scores
from obafx.passes.importance import ScoreContext

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180


class Tiny(nn.Module):
    """conv-BN-ReLU, conv-ReLU, pool, linear: a coupled BN group and a conv -> linear group."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def make_model():
    torch.manual_seed(0)
    m = Tiny().double().eval()
    with torch.no_grad():  # non-trivial running statistics, so eval-mode BN is not the identity
        m.bn1.running_mean.uniform_(-0.5, 0.5)
        m.bn1.running_var.uniform_(0.5, 1.5)
    return m


def make_data(n_batches=5, batch=3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (batch,), generator=g))
            for _ in range(n_batches)]


PRUNE = dict(channels=0.4, steps=1, verify=False)

WORKER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    import obafx
    from obafx.distributed import (all_reduce_scores, distributed_importance, init_distributed,
                                   local_parameter_scores, shard)
    from obafx.passes.importance import ScoreContext
    from test_distributed import PRUNE, make_data, make_model

    rank, world, _ = init_distributed()
    model, data = make_model(), make_data()
    mine = shard(data)
    out = {{"world": world, "n_local": len(mine), "local": {{}}, "reduced": {{}}}}
    for crit in ("oba", "taylor", "fisher"):
        local = local_parameter_scores(crit, model, mine, ScoreContext(), rank)
        out["local"][crit] = local
        out["reduced"][crit] = all_reduce_scores(local, len(mine))
    x = data[0][0][:1]
    pruned = obafx.compile_prune(model, x, importance=distributed_importance("oba"), data=mine, **PRUNE)
    out["plan"], out["state"] = obafx.report(pruned).plan, pruned.state_dict()
    # different seeds per rank on purpose: the random criterion must still agree (rank 0's seed wins)
    rnd = obafx.compile_prune(model, x, importance=distributed_importance("random"), seed=rank, **PRUNE)
    out["random_plan"] = obafx.report(rnd).plan
    # a rank whose data is NaN fails; every rank must raise (not hang)
    bad = [(b[0] * float("nan"), b[1]) for b in mine] if rank == 1 else mine
    try:
        obafx.compile_prune(model, x, importance=distributed_importance("oba"), data=bad, **PRUNE)
    except obafx.ScoreError as err:
        out["nan_error"] = str(err)
    # ranks holding different weights are refused on every rank
    torch.manual_seed(rank)
    other = make_model() if rank == 0 else type(model)().double().eval()
    try:
        obafx.compile_prune(other, x, importance=distributed_importance("oba"), data=mine, **PRUNE)
    except obafx.ConfigError as err:
        out["model_error"] = str(err)
    # the Torch-Pruning importance, all-reduced over the ranks
    import torch_pruning as tp
    from obafx.tp_interop import OBAImportance
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    group = dg.get_pruning_group(model.conv1, tp.prune_conv_out_channels, list(range(4)))
    out["tp_conv1"] = OBAImportance(mine, distributed=True)(group)
    torch.save(out, {out!r} + "/rank%d.pt" % rank)
""")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the worker on two gloo ranks once; returns both ranks' saved results."""
    tmp = tmp_path_factory.mktemp("dist")
    script = tmp / "worker.py"
    script.write_text(WORKER.format(tests=str(ROOT / "tests"), out=str(tmp)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    try:
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s: {(err.stderr or b'')[-3000:]!r}")
    if proc.returncode != 0:  # the ranks' own tracebacks, not only torchrun's summary
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("[rank") or "Error" in ln]
        pytest.fail(f"torchrun exited with {proc.returncode}:\n" + "\n".join(lines[-80:]))
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def test_reduced_scores_equal_single_process_on_union(ranks):
    model, data = make_model(), make_data()
    single = {"oba": parameter_scores(model, data), "taylor": taylor_scores(model, data),
              "fisher": fisher_scores(model, data)}
    assert [r["n_local"] for r in ranks] == [3, 2] and all(r["world"] == 2 for r in ranks)
    for crit, want in single.items():
        for r in ranks:
            got = r["reduced"][crit]
            assert set(got) == set(want)
            for name in want:
                assert got[name].dtype == torch.float64
                assert rel_err(got[name], want[name]) < 1e-10, (crit, name)
        # the shards really differ from the union: a rank's local mean alone would not pass
        assert max(rel_err(ranks[0]["local"][crit][n], want[n]) for n in want) > 1e-6
        for name in want:  # every rank received the same reduced tensor, bit for bit
            assert torch.equal(ranks[0]["reduced"][crit][name], ranks[1]["reduced"][crit][name])


def test_ranks_end_with_identical_models_equal_to_single_process(ranks):
    a, b = ranks
    assert a["plan"] == b["plan"] and a["plan"], "ranks pruned differently (or nothing)"
    assert a["state"].keys() == b["state"].keys()
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    model, data = make_model(), make_data()
    single = obafx.compile_prune(model, data[0][0][:1], importance="oba", data=data, **PRUNE)
    assert obafx.report(single).plan == a["plan"]
    # BatchNorm recalibrated on the union of the shards: the single-process statistics, up to round-off
    want = single.state_dict()
    assert all(torch.allclose(a["state"][k].double(), want[k].double(), rtol=1e-12, atol=1e-12) for k in want)


def test_torch_pruning_importance_all_reduces(ranks):
    import torch_pruning as tp
    from obafx.tp_interop import OBAImportance
    model, data = make_model(), make_data()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=data[0][0])
    want = OBAImportance(data)(dg.get_pruning_group(model.conv1, tp.prune_conv_out_channels, list(range(4))))
    for r in ranks:
        assert torch.allclose(r["tp_conv1"], want, rtol=1e-10, atol=0)


def test_random_criterion_agrees_across_ranks_with_different_seeds(ranks):
    assert ranks[0]["random_plan"] == ranks[1]["random_plan"]
    model, data = make_model(), make_data()
    rank0 = obafx.compile_prune(model, data[0][0][:1], importance="random", seed=0, **PRUNE)
    assert obafx.report(rank0).plan == ranks[0]["random_plan"]


def test_failures_raise_on_every_rank(ranks):
    assert "NaN" in ranks[1]["nan_error"]  # the failing rank reports its own error
    assert "failed on 1 of 2 ranks" in ranks[0]["nan_error"]
    assert all("disagree on the model" in r["model_error"] for r in ranks)


# ------------------------------------------------------------------ single process (no process group)

def test_without_process_group_matches_builtin_criterion():
    model, data = make_model(), make_data(3)
    x = data[0][0][:1]
    for crit in ("oba", "magnitude"):
        ours = obafx.compile_prune(model, x, importance=distributed_importance(crit), data=data, **PRUNE)
        ref = obafx.compile_prune(model, x, importance=crit, data=data, **PRUNE)
        assert obafx.report(ours).plan == obafx.report(ref).plan
        assert obafx.report(ours).importance == f"{crit} (distributed)"


def test_without_process_group_matches_builtin_criterion_under_a_macs_budget():
    """A MACs budget ranks "oba" per MAC by default: the distributed callable must rank the same way (on a tiny
    LLaMA, where groups' MACs per unit differ, so ranking by score alone gives another plan)."""
    pytest.importorskip("transformers")
    from tests.hf_models import VOCAB, build
    model, g = build("llama"), torch.Generator().manual_seed(0)
    data = [(ids, ids) for ids in (torch.randint(0, VOCAB, (2, 16), generator=g) for _ in range(2))]
    kw = dict(data=data, macs=0.6, loss_fn=obafx.causal_lm_loss, verify=False)
    ours = obafx.compile_prune(model, data[0][0], importance=distributed_importance("oba"), **kw)
    ref = obafx.compile_prune(model, data[0][0], importance="oba", **kw)
    assert obafx.report(ours).plan == obafx.report(ref).plan


def test_all_reduce_scores_weights_by_batch_count_and_shard_covers_data():
    s = {"w": torch.tensor([1.0, 3.0], dtype=torch.float64)}
    assert torch.equal(all_reduce_scores(s, 4)["w"], s["w"])  # world size 1: the mean is the local mean
    data = list(range(7))
    parts = [shard(data, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == data and [len(p) for p in parts] == [3, 2, 2]
    with pytest.raises(obafx.ConfigError, match="at least one batch per rank"):
        shard([1], 0, 2)
    with pytest.raises(obafx.ConfigError, match="unknown"):
        distributed_importance("nope")
    with pytest.raises(obafx.ConfigError):
        local_parameter_scores("magnitude", make_model(), [], ScoreContext())


@pytest.mark.slow
def test_example_script_under_torchrun(tmp_path):
    """examples/distributed_prune.py: both ranks write the same plan and weights hashes, and MACs go down."""
    import json
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "examples" / "distributed_prune.py"), "--out", str(tmp_path), "--data", "synthetic",
           "--batches", "4", "--batch-size", "8", "--steps", "1", "--width", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert (a["plan_sha256"], a["state_sha256"]) == (b["plan_sha256"], b["state_sha256"])
    assert a["world_size"] == 2 and a["macs_after"] < a["macs_before"]
    assert "all ranks identical: True" in proc.stdout
