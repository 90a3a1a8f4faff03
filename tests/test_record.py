"""The meta run's shape shortcuts (passes/meta_shapes.py) against torch's own meta kernels.

Every shortcut must give the kernel's shape, strides and dtype, and must step aside (None) wherever the kernel
raises, so that the error a user sees is torch's. Also: the lean meta run equals a real run node by node.
"""
import operator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from obafx.passes import meta_shapes, record
from obafx.passes.trace import trace

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def kernel(module, x):
    """The meta kernel's answer (a meta copy of the module run on x), or the exception it raises."""
    try:
        return module.to("meta")(x)
    except Exception as exc:  # noqa: BLE001 - any refusal counts
        return exc


def assert_agrees(module, x):
    shortcut = meta_shapes.module_output(module, (x,), {})
    expected = kernel(module, x)
    if isinstance(expected, Exception):
        assert shortcut is None, f"the kernel raises {expected!r}, the shortcut gave {shortcut}"
    elif shortcut is not None:
        assert (shortcut.shape, shortcut.stride(), shortcut.dtype) == (expected.shape, expected.stride(), expected.dtype)
        assert shortcut.is_meta


@settings(max_examples=150, deadline=None)
@given(n=st.sampled_from([1, 2, 3]), groups=st.sampled_from([1, 2]), cin=st.sampled_from([2, 4]),
       cout=st.sampled_from([2, 6]), k=st.integers(1, 4), stride=st.integers(1, 3), dilation=st.integers(1, 2),
       padding=st.sampled_from([0, 1, 2, "valid", "same"]), size=st.integers(1, 9), batched=st.booleans(),
       channels_off=st.sampled_from([0, 0, 0, 1]), bias=st.booleans(), double=st.booleans())
def test_convolution_shortcut_matches_the_kernel(n, groups, cin, cout, k, stride, dilation, padding, size, batched,
                                                 channels_off, bias, double):
    if padding == "same":
        stride = 1  # torch refuses 'same' with strides at construction
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[n](cin, cout, k, stride=stride, padding=padding,
                                                         dilation=dilation, groups=groups, bias=bias)
    shape = ((2,) if batched else ()) + (cin + channels_off,) + (size,) * n
    x = torch.empty(shape, device="meta", dtype=torch.float64 if double else torch.float32)
    assert_agrees(conv, x)


@settings(max_examples=60, deadline=None)
@given(lead=st.lists(st.integers(1, 3), max_size=3), fin=st.sampled_from([3, 4]), off=st.sampled_from([0, 0, 1]),
       bias=st.booleans())
def test_linear_shortcut_matches_the_kernel(lead, fin, off, bias):
    assert_agrees(nn.Linear(fin, 5, bias=bias), torch.empty(*lead, fin + off, device="meta"))


@pytest.mark.parametrize("module, shape", [
    (nn.BatchNorm2d(4), (2, 4, 3, 3)), (nn.BatchNorm2d(4), (2, 5, 3, 3)), (nn.BatchNorm1d(4), (2, 4)),
    (nn.BatchNorm2d(4), (4, 3, 3)), (nn.LayerNorm(6), (2, 3, 6)), (nn.LayerNorm(6), (2, 6, 3)),
    (nn.ReLU(), (2, 3)), (nn.GELU(), (3,)), (nn.Identity(), (2, 2, 2)),
])
def test_shape_keeping_shortcuts_match_the_kernels(module, shape):
    assert_agrees(module.eval(), torch.empty(shape, device="meta"))


def test_no_shortcut_for_hooked_subclassed_or_channels_last_calls():
    conv = nn.Conv2d(4, 4, 3)
    x = torch.empty(1, 4, 8, 8, device="meta")
    assert meta_shapes.module_output(conv, (x,), {}) is not None  # the premise: the plain case has one
    assert meta_shapes.module_output(conv, (x.to(memory_format=torch.channels_last),), {}) is None
    conv.register_forward_hook(lambda *a: None)
    assert meta_shapes.module_output(conv, (x,), {}) is None

    class MyConv(nn.Conv2d):
        pass
    assert meta_shapes.module_output(MyConv(4, 4, 3), (x,), {}) is None


def test_cat_shortcut_matches_the_kernel():
    a, b = torch.empty(2, 3, 4, device="meta"), torch.empty(2, 5, 4, device="meta")
    m = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
    cases = (((a, b), 1), ((a, b), -2), ((a, a), 0), ((a, b), 0), ((a, b.double()), 1), ((a, m(2, 3)), 1),
             ((a, m(2, 3, 5)), 1), ((a, m(3, 3, 4)), 1), ((a, a, m(2, 3, 7)), -1), ([m(1, 8, 2, 2)] * 32, 1))
    shortcuts = 0
    for tensors, dim in cases:
        shortcut = meta_shapes.cat(tensors, dim)
        shortcuts += shortcut is not None
        try:
            expected = torch.cat(tensors, dim)
        except Exception:  # noqa: BLE001
            assert shortcut is None
            continue
        if shortcut is not None:
            assert (shortcut.shape, shortcut.stride(), shortcut.dtype) == (expected.shape, expected.stride(),
                                                                        expected.dtype)
    assert shortcuts == 5  # the shortcut answered every case that fits it (one dtype, sizes agree off dim)


@pytest.mark.parametrize("op", [operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.mul])
@pytest.mark.parametrize("a, b", [
    ((2, 3, 4, 4), (2, 3, 4, 4)), ((2, 3, 4, 4), (1, 3, 1, 1)), ((2, 3), 2.0), (3, (2, 3)), ((2, 3), True),
    ((2, 3, 4, 4), "channels_last"), ((2, 3), "double"), ((2, 3), "int"), ((2, 3), (3, 2)),
])
def test_binary_shortcut_matches_the_kernel(op, a, b):
    def make(spec, like=None):
        if spec == "channels_last":
            return torch.empty(like, device="meta").to(memory_format=torch.channels_last)
        if spec in ("double", "int"):
            return torch.empty(like, device="meta", dtype=torch.float64 if spec == "double" else torch.int64)
        return torch.empty(spec, device="meta") if isinstance(spec, tuple) else spec
    x = make(a)
    y = make(b, like=a)
    shortcut = meta_shapes.binary(op, (x, y), {})
    try:
        expected = op(x, y)
    except Exception:  # noqa: BLE001
        assert shortcut is None
        return
    if shortcut is not None:
        assert (shortcut.shape, shortcut.stride(), shortcut.dtype) == (expected.shape, expected.stride(), expected.dtype)
    if isinstance(a, tuple) and a == b:
        assert shortcut is not None  # the plain case takes the shortcut


class Mixed(nn.Module):
    """Shortcut layers and ops, a layer that needs its meta twin (GroupNorm), a module called twice, a free
    parameter."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.act = nn.ReLU()
        self.scale = nn.Parameter(torch.ones(1, 8, 1, 1))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.act(self.norm(self.conv(x))) * self.scale
        y = self.act(y + y) / 2
        return self.fc(torch.cat([y, y], 2).mean((2, 3)))


def test_meta_run_equals_a_real_run_node_by_node():
    traced = trace(Mixed().train(), torch.randn(1, 3, 6, 6))
    meta = record.meta_values(traced.gm, traced.inputs)
    real = record.real_values(traced.gm, traced.inputs)
    assert meta.keys() == real.keys()
    for name, value in meta.items():
        assert value.is_meta and value.shape == real[name].shape and value.dtype == real[name].dtype, name
    assert traced.gm.training  # the real run restores the mode; the meta run never touches the module
    assert all(p.device.type == "cpu" for p in traced.gm.parameters())


def test_recorded_values_are_dropped_when_the_graph_changes():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4)).eval()
    traced = trace(model, torch.randn(2, 3, 6, 6))
    assert traced.recorded_values() is not None
    flatten = next(n for n in traced.gm.graph.nodes if n.target == "2")
    flatten.args = (flatten.args[0],) + flatten.args[1:]  # the same arguments again: still valid
    assert traced.recorded_values() is not None
    relu = next(n for n in traced.gm.graph.nodes if n.target == "1")
    flatten.args = (relu.args[0],)  # the graph now skips the ReLU: what was recorded no longer describes it
    assert traced.recorded_values() is None


def test_named_tensors_lists_what_named_parameters_and_buffers_list():
    """One walk gives the same (name, tensor) list as named_parameters + named_buffers without deduplication:
    tied weights under both names, None parameters and buffers skipped, parameters first."""
    from obafx.passes.trace import named_tensors

    net = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False), nn.BatchNorm1d(5), nn.Linear(5, 3))
    net[1].weight = net[0].weight  # tied: Embedding(5, 4) and Linear(4, 5) weights are both 5 x 4
    net[3].register_buffer("unset", None)
    expected = [*net.named_parameters(remove_duplicate=False), *net.named_buffers(remove_duplicate=False)]
    assert [(n, id(t)) for n, t in named_tensors(net)] == [(n, id(t)) for n, t in expected]
    assert "1.weight" in dict(named_tensors(net)) and "3.unset" not in dict(named_tensors(net))


class OwnWalk(nn.Module):
    """A module whose own named_modules hides a child (``hidden``): walks must go its way."""

    def __init__(self):
        super().__init__()
        self.hidden, self.shown = nn.Linear(2, 2), nn.Linear(2, 2)

    def named_modules(self, memo=None, prefix="", remove_duplicate=True):
        yield prefix, self
        yield (f"{prefix}.shown" if prefix else "shown"), self.shown


def test_named_tensors_walks_like_named_modules():
    """Nested containers, a module shared under two names (listed under both), a None child, and a class with
    its own named_modules (its walk is used): the same list as named_parameters + named_buffers."""
    import torchvision

    from obafx.passes.trace import named_tensors

    shared = nn.BatchNorm1d(3)
    net = nn.Sequential(nn.Sequential(nn.Linear(3, 3), shared), nn.ModuleDict({"a": shared, "b": OwnWalk()}))
    net.add_module("gone", None)
    for model in (net, torchvision.models.resnet18()):
        expected = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        assert [(n, id(t)) for n, t in named_tensors(model)] == [(n, id(t)) for n, t in expected]
    assert "1.b.shown.weight" in dict(named_tensors(net)) and "1.b.hidden.weight" not in dict(named_tensors(net))


def test_modules_by_name_is_named_modules_without_deduplication():
    import torchvision

    from obafx.passes.tensors import modules_by_name

    shared = nn.ReLU()
    net = nn.Sequential(nn.Sequential(shared, nn.Linear(2, 2)), shared)
    for model in (net, torchvision.models.densenet121()):
        got, expected = modules_by_name(model), dict(model.named_modules(remove_duplicate=False))
        assert list(got) == list(expected) and all(got[k] is expected[k] for k in expected)
    assert "1" in modules_by_name(net) and "0.0" in modules_by_name(net)


def test_module_list_is_modules():
    """`module_list` lists what ``modules()`` yields: each module once (a shared subtree is not walked again),
    None children skipped, a class with its own walk walked its way."""
    import torchvision

    from obafx.passes.tensors import module_list

    shared = nn.Sequential(nn.ReLU(), nn.Linear(2, 2))
    net = nn.Sequential(nn.Sequential(shared, nn.Linear(2, 2)), shared)
    net.add_module("gone", None)
    own = nn.Sequential(net, nn.Sequential(OwnWalk()))
    for model in (net, own, torchvision.models.densenet121()):
        assert [id(m) for m in module_list(model)] == [id(m) for m in model.modules()]
    assert len(module_list(net)) == 6 and len(module_list(own)) == 10  # OwnWalk lists itself and "shown"


class _Grows(nn.Module):
    """A leaf whose forward registers a buffer when it first runs; ``item()`` keeps the meta run from standing in."""

    def forward(self, x):
        if not hasattr(self, "seen"):
            self.register_buffer("seen", torch.zeros(3))
        return x * (x.sum().item() > -1e9)


def test_recorded_values_stay_valid_after_a_real_run_that_adds_a_tensor():
    """trace keys the recorded values by the module as the check run left it: the meta run's key reuses the walk
    made before it, a real run's is taken afterwards (here it added a buffer), so analyze does not run again."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _Grows(), nn.Conv2d(4, 2, 1)).eval()
    traced = trace(model, torch.randn(1, 3, 4, 4), leaf_modules=[_Grows])
    assert "1.seen" in dict(traced.gm.named_buffers()) and traced.recorded_values() is not None
    assert trace(model[:1], torch.randn(1, 3, 4, 4)).recorded_values() is not None  # the meta run's key
