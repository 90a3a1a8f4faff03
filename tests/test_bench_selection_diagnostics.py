"""benchmarks/width_swap.py and benchmarks/fixed_widths.py: the pieces their conclusions rest on.

width_swap recovers which units a pruned model kept and rebuilds it as a masked dense model; both must be exact,
or a swap measures the reconstruction instead of the criterion. fixed_widths must remove the same number of units
per group for every criterion, and the lowest-scored ones.
"""
import copy
from types import SimpleNamespace

import pytest
import thop
import torch

import obafx
from obafx.bench.data import default_root
from obafx.bench.models import vgg_bn
from tests.bench_scripts import load_benchmark

EXAMPLE = torch.zeros(1, 1, 32, 32)


def _dense_with_distinct_norms(seed: int = 0):
    """A small VGG-BN whose BatchNorm weights, biases and running stats all differ (the init makes them equal)."""
    torch.manual_seed(seed)
    model = vgg_bn(cfg=(8, "M", 16, "M", 16, "M", 16, "M"), hidden=12)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _pruned(dense):
    return obafx.compile_prune(dense, EXAMPLE, macs=0.5, importance="magnitude", verify=False).eval()


def test_masked_dense_model_computes_what_the_pruned_model_computes():
    swap = load_benchmark("width_swap")
    dense = _dense_with_distinct_norms()
    pruned = _pruned(dense)
    kept = swap.kept_units(dense, pruned)
    assert {n: len(k) for n, k in kept.items()} == {n: w for n, w in swap.proto.widths(pruned).items() if n in kept}
    assert any(len(k) < swap.prunable_layers(dense)[n].weight.shape[0] for n, k in kept.items())
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(swap.masked(dense, kept)(x), pruned(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(dense(x), pruned(x), atol=1e-3)  # the pruning changed something to check
    assert swap.layer_macs(dense, kept) / swap.layer_macs(dense, {}) == pytest.approx(
        _conv_linear_macs(pruned) / _conv_linear_macs(dense), rel=1e-9)


def _conv_linear_macs(model) -> float:
    """thop's MAC count with norms, activations and pools counted as free (what layer_macs counts)."""
    def free(m, x, y):
        m.total_ops += torch.zeros(1, dtype=torch.float64)
    free_ops = {torch.nn.BatchNorm2d: free, torch.nn.ReLU: free, torch.nn.MaxPool2d: free}
    return float(thop.profile(copy.deepcopy(model), inputs=(EXAMPLE,), custom_ops=free_ops, verbose=False)[0])


def test_kept_units_refuses_a_model_it_cannot_match_one_to_one():
    swap = load_benchmark("width_swap")
    dense = _dense_with_distinct_norms()
    pruned = _pruned(dense)
    with torch.no_grad():
        pruned.get_submodule("features.1").weight.add_(1e-3)  # no longer the dense model's values
    with pytest.raises(RuntimeError, match="features.0"):
        swap.kept_units(dense, pruned)


def test_lowest_per_group_removes_the_same_count_per_group_and_the_lowest_scores():
    fixed = load_benchmark("fixed_widths")
    coupling = SimpleNamespace(groups=[SimpleNamespace(units=(0, 1, 2, 3), width=4),
                                       SimpleNamespace(units=(4, 5, 6), width=3),
                                       SimpleNamespace(units=(7,), width=1)])
    scores = {0: 0.4, 1: 0.1, 2: 0.3, 3: 0.9, 4: 2.0, 5: -1.0, 6: 5.0, 7: 0.0}
    assert fixed.lowest_per_group(coupling, scores, keep=0.5) == {1, 2, 4, 5}  # 4 -> 2 kept, 3 -> 1, 1 -> 1
    assert fixed.lowest_per_group(coupling, scores, keep=0.25) == {1, 2, 0, 5, 4}


@pytest.mark.skipif(not any(default_root().glob("*")), reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)")
def test_every_criterion_gets_the_same_widths(monkeypatch):
    fixed = load_benchmark("fixed_widths")
    monkeypatch.setattr(fixed, "CRITERIA", {k: fixed.CRITERIA[k] for k in ("random", "magnitude", "taylor signed")})
    train_set = fixed.fmnist.fashion_mnist("train")
    test_batches = [fixed.fmnist.calibration_batches(train_set, 1, 32, seed=5, step=0)[0]]
    rows = fixed.measure("resnet20", [0.5], [0], test_batches, train_set)
    assert len(rows) == 3 and len({tuple(r["widths"].items()) for r in rows}) == 1
    assert rows[0]["widths"]["conv1"] == 8 and all(0 <= r["acc"] <= 1 for r in rows)
    table = fixed.summary(rows + [dict(rows[0], seed=1, acc=rows[0]["acc"] + 0.1)])
    random_row = next(s for s in table if s["criterion"] == "random")
    assert random_row["n"] == 2 and random_row["acc"] == pytest.approx(rows[0]["acc"] + 0.05)
