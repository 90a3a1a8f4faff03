"""OBA as a Torch-Pruning importance: group scores against obafx's own aggregate, a peer differential against
Torch-Pruning's Taylor importance, and Torch-Pruning's MetaPruner driven by it."""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from torch_pruning.pruner import function as tpf

from obafx.passes.channel_graph import analyze
from obafx.passes.coupling import couple
from obafx.passes.hvp import parameter_scores
from obafx.passes.importance import aggregate, summands
from obafx.passes.trace import trace
from obafx.tp_interop import CriterionImportance, OBAImportance, member_vector

ROOT = Path(__file__).resolve().parents[1]


class Net(nn.Module):
    """conv1-BN-ReLU, conv2-ReLU-pool, flatten -> fc1-ReLU -> fc2: conv-out, BN, flatten and linear groups."""

    def __init__(self, bias=True):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=bias)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1, bias=bias)
        self.fc1 = nn.Linear(5 * 4 * 4, 6, bias=bias)
        self.fc2 = nn.Linear(6, 3, bias=bias)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(torch.tanh(self.fc1(torch.flatten(x, 1))))


def setup(bias=True, n_batches=2):
    torch.manual_seed(0)
    model = Net(bias).double().eval()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.3, 0.3)
        model.bn1.weight.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (3,), generator=g))
               for _ in range(n_batches)]
    return model, batches


def groups_by_root(model, x):
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    found = {g[0].dep.target.module: g for g in dg.get_all_groups()}
    found[model.bn1] = dg.get_pruning_group(model.bn1, tp.prune_batchnorm_out_channels, list(range(4)))
    return found


@pytest.fixture(scope="module")
def scored():
    model, batches = setup()
    return model, batches, parameter_scores(model, batches, train=True)  # OBA's default scoring mode


@pytest.mark.parametrize("unit_sum", [None, "signed"])  # None: OBA's default, "member"
def test_group_scores_equal_obafx_aggregate(scored, unit_sum):
    model, batches, ps = scored
    imp = OBAImportance(batches, unit_sum=unit_sum)
    coupling = couple(analyze(trace(model, batches[0][0])))
    units = aggregate(coupling, summands(ps, unit_sum or "member"))
    roots = groups_by_root(model, batches[0][0])
    # each TP group's root channels, and the obafx parameter slot that names the same channels
    cases = [(model.conv1, "conv1.weight", 4), (model.bn1, "conv1.weight", 4), (model.conv2, "conv2.weight", 5),
             (model.fc1, "fc1.weight", 6)]
    for root, slot, width in cases:
        got = imp(roots[root])
        assert got is not None and got.shape == (width,) and torch.isfinite(got).all()
        want = torch.tensor([units[int(u)] for u in coupling.slot_units[(slot, 0)]], dtype=torch.float64)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-15), (slot, got, want)
        assert got.max() == 1.0  # OBA normalisation: the group's best channel scores 1
    assert imp.computations == 1  # one computation for all groups of the same model state


def test_torch_pruning_normalizers_rescale_the_same_scores(scored):
    model, batches, ps = scored
    group = groups_by_root(model, batches[0][0])[model.conv1]
    imp = OBAImportance(batches)
    by_max = imp(group)
    imp.normalizer = "mean"
    by_mean = imp(group)
    assert imp.computations == 1
    assert torch.allclose(by_mean, by_max / by_max.mean(), rtol=1e-12)


def test_member_vectors_are_row_and_grouped_column_sums():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, groups=2)
    s = torch.randn_like(conv.weight, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    scores = {id(conv.weight): s, id(conv.bias): b}
    rows = member_vector(conv, tp.prune_conv_out_channels, [5, 0], scores)
    assert torch.allclose(rows, torch.stack([s[5].sum() + b[5], s[0].sum() + b[0]]))
    cols = member_vector(conv, tp.prune_conv_in_channels, range(4), scores)
    # input channel i is read by the rows of its group only: group i // 2, column i % 2
    want = torch.stack([s[(i // 2) * 3:(i // 2 + 1) * 3, i % 2].sum() for i in range(4)])
    assert torch.allclose(cols, want)
    assert member_vector(nn.BatchNorm2d(6), tp.prune_batchnorm_out_channels, [0], scores) is None
    dw = nn.Conv2d(3, 3, 3, groups=3, bias=False)  # depthwise: Torch-Pruning's own magnitude skips these
    sd = torch.randn_like(dw.weight, dtype=torch.float64)
    got = member_vector(dw, tpf.prune_depthwise_conv_out_channels, [2, 1], {id(dw.weight): sd})
    assert torch.allclose(got, torch.stack([sd[2].sum(), sd[1].sum()]))


def test_taylor_equals_torch_pruning_taylor_on_unflattened_groups():
    """Differential against a peer: with one batch, a bias-free model and the same normaliser, obafx's Taylor
    importance equals Torch-Pruning's multivariable GroupTaylorImportance (|Σ θ·g| per member, mean)."""
    model, batches = setup(bias=False, n_batches=1)
    x, y = batches[0]
    ours = CriterionImportance("taylor", batches, normalizer="mean")
    roots = groups_by_root(model, x)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    peer = tp.importance.GroupTaylorImportance(multivariable=True, normalizer="mean")
    for root in (model.conv1, model.fc1):  # flatten groups differ by design: TP takes |.| per column
        got, want = ours(roots[root]), peer(roots[root])
        assert torch.allclose(got.float(), want, rtol=1e-4), (root, got, want)


def test_abs_taylor_equals_torch_pruning_default_taylor():
    """Differential against a peer: unit_sum="abs" is Torch-Pruning's default Taylor rule (Σ |θ·g| per member,
    mean over members, mean-normalised); the signed sum is not."""
    model, batches = setup(bias=False, n_batches=1)
    x, y = batches[0]
    roots = groups_by_root(model, x)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    peer = tp.importance.GroupTaylorImportance(multivariable=False, normalizer="mean")
    ours = {s: CriterionImportance("taylor", batches, normalizer="mean", unit_sum=s) for s in ("abs", "signed")}
    for root in (model.conv1, model.fc1):
        want = peer(roots[root])
        assert torch.allclose(ours["abs"](roots[root]).float(), want, rtol=1e-4), root
        assert not torch.allclose(ours["signed"](roots[root]).float(), want, rtol=1e-4), root
    assert CriterionImportance("oba", batches).unit_sum == "member" and ours["signed"].unit_sum == "signed"


def test_meta_pruner_rescores_each_step_and_reduces_macs():
    model, batches = setup()
    x = batches[0][0]
    served = []

    def fresh():  # a different calibration batch at every step
        served.append(len(served))
        return [batches[len(served) % 2]]
    imp = OBAImportance(fresh)
    macs0, _ = tp.utils.count_ops_and_params(model, x)
    pruner = tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=0.5, iterative_steps=2,
                                  ignored_layers=[model.fc2])
    pruner.step()
    after_one = {n: tuple(p.shape) for n, p in model.named_parameters()}
    pruner.step()
    macs1, _ = tp.utils.count_ops_and_params(model, x)
    assert macs1 < 0.75 * macs0
    assert imp.computations == 2 and len(served) == 2
    assert imp.history[1] == after_one != imp.history[0]  # step 2 scored the model pruned by step 1
    assert torch.isfinite(model(x)).all()


def test_cache_follows_in_place_updates():
    model, batches = setup()
    imp = OBAImportance(batches)
    group = groups_by_root(model, batches[0][0])[model.conv1]
    first = imp(group)
    imp(group)
    assert imp.computations == 1
    with torch.no_grad():
        model.conv2.weight.mul_(-2.0)  # an optimizer-style in-place step bumps the version counter
    second = imp(group)
    assert imp.computations == 2 and not torch.allclose(first, second)


def test_bad_arguments_are_obafx_errors():
    import obafx
    with pytest.raises(obafx.ConfigError, match="calibration data"):
        OBAImportance(None)
    with pytest.raises(obafx.ConfigError, match="criterion"):
        CriterionImportance("magnitude", [1])


def test_example_runs_and_prunes():
    spec = importlib.util.spec_from_file_location("tp_oba_example", ROOT / "examples" / "tp_oba_example.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(["--steps", "2", "--batches", "1", "--batch-size", "4"])
    macs0, macs1 = out["macs"]
    assert macs1 < macs0 and out["computations"] == 2 and torch.isfinite(out["output"]).all()
