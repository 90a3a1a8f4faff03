"""passes/fx_module.py builds the GraphModule fx builds: same module tree (names, order, types, which modules
are the root's own), same parameters and buffers (and persistence), same attributes, same code."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torchvision
from torch import nn

from obafx.passes import fx_module
from obafx.passes.fx_module import graph_module
from obafx.passes.tracer import LeafTracer
from tests.small_models import CASES


class Attrs(nn.Module):
    """get_attr targets: a parameter, a persistent and a non-persistent buffer, deep in containers; a module
    shared under two names; a None child."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(3, 3)), nn.Linear(3, 3)])
        self.blocks[0].register_buffer("kept", torch.ones(3))
        self.blocks[0].register_buffer("scratch", torch.ones(3), persistent=False)
        self.scale = nn.Parameter(torch.ones(3))
        self.alias = self.blocks[1]
        self.nothing = None

    def forward(self, x):
        x = self.blocks[0](x) * self.blocks[0].kept + self.blocks[0].scratch
        return self.alias(self.blocks[1](x)) * self.scale


class Named(nn.Module):
    """Submodules named like GraphModule attributes: fx's own constructor decides (it refuses 'meta')."""

    def __init__(self, name):
        super().__init__()
        self.add_module(name, nn.Linear(2, 2))
        self.name = name

    def forward(self, x):
        return getattr(self, self.name)(x)


def _describe(gm: fx.GraphModule, root: nn.Module):
    own = {id(m) for m in root.modules()} | {id(t) for t in (*root.parameters(), *root.buffers())}
    modules = [(n, type(m).__name__, id(m) in own, sorted(m._non_persistent_buffers_set), m.training)
               for n, m in gm.named_modules(remove_duplicate=False)]
    tensors = [(n, id(t) in own) for n, t in (*gm.named_parameters(remove_duplicate=False),
                                                 *gm.named_buffers(remove_duplicate=False))]
    state = sorted(k for k in vars(gm) if k not in ("_graph",))
    return (type(gm).__mro__[1:], modules, tensors, list(gm.state_dict()), state, gm.training, gm.code,
            gm._tracer_cls, gm._tracer_extras, gm.meta, gm.graph.owning_module is gm)


def _build_both(model: nn.Module):
    ours_graph, fx_graph = LeafTracer().trace(model), LeafTracer().trace(model)
    cls = fx_module._module_class()
    return graph_module(model, ours_graph, "M"), cls(model, fx_graph, "M")


MODELS = {"attrs": Attrs, "resnet18": lambda: torchvision.models.resnet18(),
          "densenet121": lambda: torchvision.models.densenet121(),
          "vit_b_16": lambda: torchvision.models.vit_b_16(), **{f"small:{k}": c.make for k, c in CASES.items()}}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_same_module_as_fx(name):
    model = MODELS[name]().eval()
    ours, theirs = _build_both(model)
    assert _describe(ours, model) == _describe(theirs, model)
    assert ours.graph is not theirs.graph and ours.graph.owning_module is ours


def test_the_fast_path_ran():
    """The comparison above is between two different constructions: fx's _copy_attr is not what installed ours."""
    calls = []
    original = fx_module._install
    fx_module._install = lambda *a: (calls.append(a[2]), original(*a))
    try:
        _build_both(Attrs())
    finally:
        fx_module._install = original
    assert "blocks.0.kept" in calls and "blocks.1" in calls


@pytest.mark.parametrize("name", ["graph", "code", "meta", "shape_env", "forward_hooks"])
def test_names_the_graph_module_uses_go_through_fx(name):
    model = Named(name)
    graph = LeafTracer().trace(model)
    try:
        expected = fx_module._module_class()(model, LeafTracer().trace(model), "M")
    except Exception as exc:  # fx refuses some names: so must we, the same way
        with pytest.raises(type(exc)):
            graph_module(model, graph, "M")
        return
    assert _describe(graph_module(model, graph, "M"), model) == _describe(expected, model)


def test_module_registration_hooks_go_through_fx():
    """A global module registration hook sees the same registrations as under fx's constructor."""
    seen = []
    handle = nn.modules.module.register_module_module_registration_hook(
        lambda module, name, sub: seen.append((type(module).__name__, name, type(sub).__name__)))
    try:
        model = Attrs()
        runs = []
        for build in (lambda g: graph_module(model, g, "M"), lambda g: fx_module._module_class()(model, g, "M")):
            graph = LeafTracer().trace(model)
            seen.clear()
            build(graph)
            runs.append(list(seen))
    finally:
        handle.remove()
    assert runs[0] == runs[1] and ("Module", "1", "Linear") in runs[0]


class FrozenNorm(nn.BatchNorm2d):
    """A norm that stays in eval mode whatever train() asks (a train override)."""

    def train(self, mode=True):
        return super().train(False)


@pytest.mark.parametrize("mode", [True, False])
def test_set_training_is_train(mode):
    from obafx.passes.fx_module import set_training

    def make(norm):
        model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Sequential(norm(3), nn.ReLU()))
        model[1].train(not mode)
        model[0].training = not mode
        return model

    for norm in (nn.BatchNorm2d, FrozenNorm):
        ours, theirs = make(norm), make(norm)
        set_training(ours, mode)
        theirs.train(mode)
        assert [m.training for m in ours.modules()] == [m.training for m in theirs.modules()]
        assert all(m.training == mode for m in ours.modules() if type(m) is not FrozenNorm)
