"""Differential oracle: obafx and Torch-Pruning remove the same output channels of a few convs and must build the
same network (same output to 1e-9 relative in float64, same parameter and buffer counts).

Torch-Pruning's DependencyGraph is the peer: for each chosen conv it collects the coupled group of
``prune_conv_out_channels(conv, idxs)``; obafx removes the units at the same indices of the conv weight's output
slot, ``coupling.slot_units[(conv + ".weight", 0)][idxs]``, which pulls in its own coupled group. If either tool
couples a slice the other does not (a residual partner, a concat offset, a depthwise partner, a BN), the pruned
widths or outputs differ.
"""
import copy
import warnings

import numpy as np
import pytest
import torch
import torchvision

from obafx.passes.plan import plan_from_removed
from obafx.passes.rewrite import rewrite
from obafx.passes.verify import masked_output
from tests.prune_oracles import analyse, relative_error, one_thread

tp = pytest.importorskip("torch_pruning")

# conv layers whose output channels are removed: stems feeding residual streams or concats, internal convs,
# expansion convs tied to depthwise convs, projections on residual streams, downsample shortcuts.
CASES = {
    "resnet18": ["conv1", "layer1.0.conv1", "layer2.0.conv2", "layer3.1.conv1", "layer4.0.downsample.0"],
    "mobilenet_v2": ["features.0.0", "features.2.conv.0.0", "features.3.conv.2", "features.7.conv.0.0",
                     "features.14.conv.2"],
    "densenet121": ["features.conv0", "features.denseblock1.denselayer1.conv1",
                    "features.denseblock2.denselayer3.conv2", "features.transition2.conv"],
}


def model_and_input(name: str):
    """The float64 eval model with randomised BatchNorm affines and running statistics, and a 64x64 input."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval().double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=torch.float64))
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=torch.float64))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=torch.float64) + 0.5)
    return model, torch.randn(1, 3, 64, 64, generator=g, dtype=torch.float64)


def chosen_indices(name: str, width: int, seed: int):
    """About a quarter of ``width`` output channels, the same for both tools (sorted, as TP expects)."""
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(width, max(1, width // 4), replace=False).tolist())


def prune_with_tp(model, x, picks):
    """Torch-Pruning's groups for each (conv name, indices), pruned in order on a copy of ``model``."""
    model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TP warns about unwrapped parameters it does not need here
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    for conv, idx in picks:
        group = dg.get_pruning_group(model.get_submodule(conv), tp.prune_conv_out_channels, idxs=idx)
        group.prune()
    return model


def prune_with_obafx(model, x, picks):
    """obafx's low-level API: the units at the same indices of each conv's output slot, removed at once."""
    traced, facts, coupling = analyse(model, (x,))
    removed = set()
    for conv, idx in picks:
        units = coupling.slot_units[(conv + ".weight", 0)][idx]
        assert coupling.pinned not in units, f"obafx pins output channels of {conv}"
        removed.update(int(u) for u in units)
    return traced, coupling, removed, rewrite(traced, coupling, facts.shapes, removed)


def counts(module):
    return (sum(p.numel() for p in module.parameters()), sum(b.numel() for b in module.buffers()))


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_channels_same_network(name):
    with one_thread():
        model, x = model_and_input(name)
        picks = [(conv, chosen_indices(conv, model.get_submodule(conv).out_channels, seed))
                 for seed, conv in enumerate(CASES[name])]
        theirs = prune_with_tp(model, x, picks)
        traced, coupling, removed, ours = prune_with_obafx(model, x, picks)
        with torch.no_grad():
            y_theirs, y_ours, y_full = theirs(x), ours(x), model(x)
            y_masked = masked_output(traced, coupling, removed)
    assert counts(ours) == counts(theirs) < counts(model)
    assert relative_error(y_theirs, y_ours) < 1e-9
    assert relative_error(y_masked, y_ours) < 1e-9  # and both equal the masking oracle
    assert relative_error(y_full, y_ours) > 1e-6  # the removal changed the function: the test has teeth


@pytest.mark.parametrize("name", ["resnet18"])
def test_kept_indices_agree_tensor_by_tensor(name):
    """Beyond outputs: every obafx-sliced tensor keeps exactly the indices TP's tensor kept (values equal)."""
    with one_thread():
        model, x = model_and_input(name)
        picks = [(conv, chosen_indices(conv, model.get_submodule(conv).out_channels, seed))
                 for seed, conv in enumerate(CASES[name])]
        theirs = dict(prune_with_tp(model, x, picks).state_dict())
        traced, coupling, removed, ours = prune_with_obafx(model, x, picks)
    plan = plan_from_removed(coupling, removed)
    assert plan.kept, "the picks removed nothing"
    for name_, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs[name_]), name_
