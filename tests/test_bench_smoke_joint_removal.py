"""benchmarks/joint_removal.py: joint removal equals the sum of singles where the loss is additive in the units,
exceeds it where units interact, and a tiny run writes the documented table."""
import json

import pytest
import torch
from torch import nn

from obafx.bench.data import default_root
from obafx.passes.channel_graph import analyze
from obafx.passes.coupling import couple
from obafx.passes.trace import trace
from tests.bench_scripts import load_benchmark
from tests.small_nets import Wide


def _bench():
    return load_benchmark("joint_removal")


def test_joint_change_zeroes_all_units_at_once_and_restores_the_model(monkeypatch):
    """Two hidden units feeding a sum; the loss function is the mean output (linear in each unit's term), so
    removing both changes it by exactly the sum of removing each alone."""
    bench = _bench()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    traced = trace(net, torch.zeros(1, 3))
    coupling = couple(analyze(traced))
    (group,) = [g for g in coupling.groups if g.width == 4]
    slices = bench.unit_slices(traced.gm, coupling)
    x = torch.randn(16, 3)
    batches = [(x, torch.zeros(16, dtype=torch.long))]
    before = {k: v.clone() for k, v in traced.gm.state_dict().items()}
    # a loss linear in every hidden unit's contribution: the first logit summed
    monkeypatch.setattr(bench, "train_loss", lambda gm, b: float(gm(b[0][0])[:, 0].sum()))
    base = bench.train_loss(traced.gm, batches)
    units = list(group.units)
    single = [bench.joint_change(traced.gm, [u], slices, batches, base) for u in units]
    both = bench.joint_change(traced.gm, units[:3], slices, batches, base)
    assert all(torch.equal(v, before[k]) for k, v in traced.gm.state_dict().items())
    assert both == pytest.approx(sum(single[:3]), abs=1e-5)
    with torch.no_grad():  # and it is the network with those hidden units gone
        h = torch.relu(net[0](x))
        h[:, :3] = 0.0
        assert both == pytest.approx(float(net[2](h)[:, 0].sum()) - base, abs=1e-5)


@pytest.mark.skipif(not any(default_root().glob("*")), reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)")
def test_tiny_run_writes_joint_against_summed_per_group(tmp_path):
    out = tmp_path / "jr.json"
    assert _bench().main(["--batches", "1", "--size", "8", "--models", "resnet20", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["models"]["resnet20"]
    kinds = [g["kind"] for g in row["groups"]]
    assert kinds.count("stream") >= 1 and kinds[-1] == "widest other"
    assert all(r["interaction"] == pytest.approx(r["joint"] - r["sum_of_singles"], abs=2e-5)
               for g in row["groups"] for r in g["removals"])
    for g in row["groups"]:
        assert [r["k"] for r in g["removals"]] == sorted(r["k"] for r in g["removals"])
        assert all(r["k"] <= g["units"] for r in g["removals"])
        assert 0 <= g["negative_fraction"] <= 1 and 0 <= g["held_out_negative_fraction"] <= 1
        # a single unit removed "together" is that unit's single change, on either image set
        first = g["removals"][0]
        if first["k"] == 1:
            assert first["held_out_joint"] == pytest.approx(first["held_out_sum_of_singles"], abs=2e-5)


def test_named_groups_join_the_streams_and_the_widest_one_once_each():
    """--groups adds the groups whose ids match a pattern, after the default choice, never one twice."""
    bench = _bench()
    coupling = couple(analyze(trace(Wide(), torch.zeros(1, 6))))  # groups a (40 wide) and b (32)
    default = bench.chosen_groups(coupling)
    assert [(g.id, kind) for g, kind in default] == [("a", "widest other")]
    named = bench.chosen_groups(coupling, ["b*", "a*", "nothing*"])
    assert [(g.id, kind) for g, kind in named] == [("a", "widest other"), ("b", "named")]
