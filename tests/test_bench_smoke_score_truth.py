"""Smoke run of benchmarks/score_truth.py on a tiny setting, and its single-unit removal on a known model."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from obafx.bench.data import default_root
from obafx.passes.channel_graph import analyze
from obafx.passes.coupling import couple
from obafx.passes.trace import trace
from tests.bench_scripts import load_benchmark


def _bench():
    return load_benchmark("score_truth")


def test_removing_a_unit_zeroes_its_slices_and_the_model_is_restored():
    """A conv-BN-ReLU-conv chain: removing hidden channel c by its slices must give the loss of the network
    whose BatchNorm outputs 0 for c (weight and bias zeroed) and whose second conv ignores c; every unit's
    change is measured from the same untouched model."""
    bench = _bench()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    traced = trace(net, torch.zeros(1, 1, 6, 6))
    coupling = couple(analyze(traced))
    (group,) = [g for g in coupling.groups if g.width == 4]
    batches = [(torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,)))]
    before = {k: v.clone() for k, v in traced.gm.state_dict().items()}
    changes = bench.true_changes(traced.gm, list(group.units), bench.unit_slices(traced.gm, coupling), batches)
    assert all(torch.equal(v, before[k]) for k, v in traced.gm.state_dict().items())
    x, y = batches[0]
    loss = lambda: torch.nn.functional.cross_entropy(net.train()(x), y).item()  # noqa: E731
    with torch.no_grad():
        base = loss()
        for c, change in enumerate(changes):
            kept = [p.clone() for p in net.parameters()]
            net[1].weight[c], net[1].bias[c], net[3].weight[:, c] = 0.0, 0.0, 0.0
            assert change == pytest.approx(loss() - base, abs=1e-6)
            for p, k in zip(net.parameters(), kept):
                p.copy_(k)


@pytest.mark.skipif(not any(default_root().glob("*")), reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)")
def test_tiny_run_reports_every_criterion_against_the_truth(tmp_path, monkeypatch):
    bench = _bench()
    monkeypatch.setattr(bench, "CRITERIA", {"taylor abs": ("taylor", dict(train=True, unit_sum="abs")),
                                            "magnitude": ("magnitude", dict())})
    out = tmp_path / "st.json"
    assert bench.main(["--batches", "1", "--size", "8", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["models"]["resnet20"]
    assert set(row["criteria"]) == {"taylor abs", "magnitude"} and row["stream_units"] > 0
    assert 0 <= row["truth_negative_fraction"] <= 1 and np.isfinite(row["truth_stream_to_rest"])
    assert all(-1 <= c["spearman_all"] <= 1 and c["stream_to_rest"] > 0 for c in row["criteria"].values())
