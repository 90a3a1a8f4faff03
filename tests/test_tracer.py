"""obafx's tracer (passes/tracer.py) against torch.fx's own: the same graph, node names, arguments, module
stacks and scope bookkeeping, on torchvision models and every small test model; fx's own path where asked."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torchvision
from torch import nn

from obafx.passes.errors import SOURCE_KEY
from obafx.passes.tracer import LeafTracer
from tests.small_models import CASES


class Twice(nn.Module):
    """One leaf and one non-leaf module each called twice (fx's ``name@1`` module-stack keys)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.block = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())

    def forward(self, x):
        return self.block(self.block(self.conv(self.conv(x)))) + torch.cat([x, x], 1).sum(1, keepdim=True)


class TorchFunctions(nn.Module):
    """Torch functions on proxies in tuples, lists, kwargs and a namedtuple (the tracer's own tracer search,
    and fx's where it does not look)."""

    def forward(self, x):
        from collections import namedtuple

        pair = namedtuple("pair", "a b")
        y = torch.cat((x, x), 1) + torch.stack([x, x]).sum(0).repeat(1, 2, 1, 1)
        z = torch.add(y, other=y) * torch.cat(pair(y, y), 1)[:, :6]
        return torch.nn.functional.relu(z).flatten(1)


class TensorAttrs(nn.Module):
    """Plain tensor attributes (fx's ``tensor_attrs``: get_attr nodes named after them), one tensor under two
    names, a child under two names and a None child (the module walks before the trace)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.full((3, 1, 1), 2.0)  # a plain attribute, not a buffer
        self.conv = nn.Conv2d(3, 3, 1)
        self.again = self.conv  # walked once, as "conv": its tensor attribute keeps that name
        self.conv.shift = torch.zeros(3, 1, 1)
        self.inner = nn.Sequential(nn.Conv2d(3, 3, 1))
        self.inner[0].offset = torch.ones(3, 1, 1)
        self.inner.alias = self.scale  # met later in the walk: fx names the tensor by this name
        self.register_module("missing", None)

    def forward(self, x):
        return self.again(self.conv(x)) * self.scale + self.conv.shift + self.inner(x) + self.inner[0].offset


def _describe(tracer: fx.Tracer, model: nn.Module):
    """Everything fx's tracer decides, as plain data: nodes (with their module stacks) and the tracer's scopes."""
    graph = tracer.trace(model)
    nodes = [(n.name, n.op, str(n.target), str(n.args), str(n.kwargs), str(n.type),
              list(n.meta.get("nn_module_stack", {}).items()), type(n.meta.get("nn_module_stack")))
             for n in graph.nodes]
    return nodes, dict(tracer.node_name_to_scope), dict(tracer.num_calls), (tracer.scope.module_path,
                                                                              tracer.scope.module_type)


MODELS = {"twice": Twice, "torch_functions": TorchFunctions, "tensor_attrs": TensorAttrs, "resnet18": lambda: torchvision.models.resnet18(),
          "densenet121": lambda: torchvision.models.densenet121(),
          "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(),
          "vit_b_16": lambda: torchvision.models.vit_b_16(), **{f"small:{k}": c.make for k, c in CASES.items()}}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_same_graph_as_fx(name):
    model = MODELS[name]()
    ours, theirs = _describe(LeafTracer(), model), _describe(fx.Tracer(), model)
    assert ours == theirs
    assert any(row[6] for row in ours[0]) or name == "torch_functions"  # module stacks compared, not empty lists


@pytest.mark.parametrize("name", sorted(MODELS))
def test_module_walks_as_fx(name):
    """The replayed trace's two walks of the module tree (tracer_root) give fx's tables, in fx's order."""
    from obafx.passes.tracer_root import _submodule_paths

    model = MODELS[name]()
    ours, theirs = LeafTracer(), fx.Tracer()
    ours.trace(model)
    theirs.trace(model)
    assert [(id(k), v) for k, v in ours.tensor_attrs.items()] == [(id(k), v) for k, v in theirs.tensor_attrs.items()]
    assert list(_submodule_paths(model).items()) == list({m: n for n, m in model.named_modules()}.items())


def test_trace_replays_this_torchs_tracer_trace(monkeypatch):
    """On the torch this project pins, module roots take the replay (so the comparisons above test it); where
    the fingerprint differs, fx's own trace runs and gives the same graph; a bare Sequential's nodes have no
    model line either way (the frame walk stops at both)."""
    from obafx.passes import tracer_root

    assert tracer_root.replays_this_torch()
    model = TensorAttrs()
    replayed = _describe(LeafTracer(), model)
    monkeypatch.setattr(tracer_root, "_KNOWN_TRACE", False)
    assert _describe(LeafTracer(), model) == replayed
    for flag in (False, True):
        monkeypatch.setattr(tracer_root, "_KNOWN_TRACE", flag)
        graph = LeafTracer().trace(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()))
        assert not any(SOURCE_KEY in n.meta for n in graph.nodes)
        assert all(SOURCE_KEY in n.meta for n in LeafTracer().trace(model).nodes if n.op == "call_module")


def test_fx_path_when_asked_for_stack_traces():
    """With record_stack_traces fx's own create_node runs (it formats the stack traces); source lines stay."""
    tracer = LeafTracer()
    tracer.record_stack_traces = True
    graph = tracer.trace(Twice())
    convs = [n for n in graph.nodes if n.op == "call_module"]
    assert all(n.stack_trace for n in convs) and all(SOURCE_KEY in n.meta for n in convs)


def test_scope_restored_when_forward_raises():
    """A module whose forward fails mid-trace leaves the tracer's scope as it found it (fx's context manager)."""

    class Bad(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.bad = Bad()

        def forward(self, x):
            return self.bad(x)

    tracer = LeafTracer()
    with pytest.raises(RuntimeError, match="boom"):
        tracer.trace(Outer())
    assert (tracer.scope.module_path, tracer.scope.module_type) == ("", None)


def test_node_creation_replays_this_torchs_graph_create_node():
    """The tracer's node creation (no pytree scan for SymInts) replays torch's Graph.create_node; on another
    torch whose create_node differs, fx's own runs (the comparisons above then test that)."""
    from obafx.passes import tracer as tracer_mod

    assert tracer_mod._KNOWN_CREATE_NODE  # the torch this project pins: the short path is the one tested above
    from collections import namedtuple

    pair = namedtuple("pair", "a b")
    assert not tracer_mod._symbolic(((1, [2.0, None]), {"k": "v"}))
    for opaque in (pair(1, 2), torch.Size([2, 3]), (1, [pair(1, 2)]), {"k": torch.Size([1])}):
        assert tracer_mod._symbolic(opaque)  # containers it does not open: fx's scan decides


def test_module_target_names_are_fxs_node_name_bases():
    """Node name bases of module paths made in one pass (tracer_root) equal fx's ``_target_to_str`` of each;
    paths the pass cannot take (a newline, a dunder name) are left to fx."""
    from obafx.passes import tracer_root

    assert tracer_root._KNOWN_NAMING  # this torch's naming is the one the pass reproduces
    graph = fx.Graph()
    paths = ["features.denseblock1.denselayer1.norm1", "Block.convA", "aB.Cd", "ABC", "a1B.xY_z", "layer.0.0",
             "\u00e9A.b", "a_B", "q.kV"]
    got = tracer_root.module_target_names(paths + ["__magic__", "new\nline"])
    assert got == {p: graph._target_to_str(p) for p in paths}
    assert tracer_root.module_target_names([]) == {}
