"""The pruned GraphModule in users' tool chains: torch.export, torch.compile, TorchScript (trace and script), ONNX.

Three pruned models: a ResNet-style CNN (residual adds, 1x1 shortcut convs, BN), a small ViT with hand-written
attention (qkv split into heads, softmax, proj), and a model built around nn.MultiheadAttention. Every path is
compared with the pruned module's own eager output on a FRESH input (not the example input it was traced on)
and, where shapes may vary, on another batch size.
"""
import shutil
import warnings

import pytest
import torch
import torch.nn as nn

import obafx
from obafx.bench.models import CifarResNet, vit_tiny

ATOL, RTOL = 1e-5, 1e-4


class MHANet(nn.Module):
    """Linear embedding -> nn.MultiheadAttention (residual, LayerNorm) -> MLP (residual) -> mean -> head."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 32)
        self.fc2 = nn.Linear(32, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.embed(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        h = self.norm(h + a)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(h.mean(1))


def _build(name):
    torch.manual_seed(0)
    if name == "resnet":
        return CifarResNet(1, in_ch=1, width=4), torch.randn(2, 1, 16, 16)
    if name == "vit":
        return vit_tiny(dim=32, depth=1, heads=2), torch.randn(2, 1, 32, 32)
    return MHANet(), torch.randn(2, 5, 8)


NAMES = ["resnet", "vit", "mha"]


@pytest.fixture(scope="module")
def pruned():
    """name -> (pruned GraphModule, fresh input of the example's shape, input with another batch size)."""
    out = {}
    for name in NAMES:
        model, x = _build(name)
        gm = obafx.compile_prune(model.eval(), x, channels=0.3)
        rep = obafx.report(gm)
        assert rep.params_after < rep.params_before, f"{name}: nothing was pruned, the export checks would be vacuous"
        g = torch.Generator().manual_seed(7)
        out[name] = (gm, torch.randn(x.shape, generator=g), torch.randn((5,) + tuple(x.shape[1:]), generator=g))
    return out


def check(got, gm, x):
    want = gm(x)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=ATOL, rtol=RTOL), float((got - want).abs().max())


@pytest.mark.parametrize("name", NAMES)
def test_torch_export_with_dynamic_batch(pruned, name):
    gm, x, x5 = pruned[name]
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(gm, (x,), dynamic_shapes=({0: batch},))
    check(ep.module()(x), gm, x)
    check(ep.module()(x5), gm, x5)


@pytest.mark.parametrize("name", NAMES)
def test_torch_compile_eager_backend(pruned, name):
    gm, x, x5 = pruned[name]
    torch._dynamo.reset()
    compiled = torch.compile(gm, backend="eager")
    check(compiled(x), gm, x)
    check(compiled(x5), gm, x5)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_torch_compile_inductor(pruned, name):
    """Inductor on the CPU needs a C++ compiler; it takes 15-70 s per model on a loaded 2-core machine."""
    if shutil.which("g++") is None and shutil.which("c++") is None and shutil.which("clang++") is None:
        pytest.skip("no C++ compiler on PATH: inductor's CPU backend cannot build kernels")
    gm, x, _ = pruned[name]
    torch._dynamo.reset()
    check(torch.compile(gm)(x), gm, x)


@pytest.mark.parametrize("name", NAMES)
def test_jit_trace(pruned, name):
    gm, x, x5 = pruned[name]
    # nn.MultiheadAttention fails torch.jit.trace's own re-trace sanity check (the graphs differ in a constant),
    # on the unpruned eager model as well: a torch limitation, so that check is off for it; outputs are compared.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(gm, (x,), check_trace=name != "mha")
    check(traced(x), gm, x)
    check(traced(x5), gm, x5)


@pytest.mark.parametrize("name", NAMES)
def test_jit_script(pruned, name):
    gm, x, x5 = pruned[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(gm)  # string annotations were dropped by trace
    check(scripted(x), gm, x)
    check(scripted(x5), gm, x5)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_onnx_export(pruned, name):
    """torch.onnx.export (dynamo) -> onnx.checker -> onnxruntime, 7-13 s per model here: marked slow."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    gm, x, _ = pruned[name]
    program = torch.onnx.export(gm, (x,), dynamo=True, verbose=False)
    proto = program.model_proto
    onnx.checker.check_model(proto, full_check=True)
    try:
        import onnxruntime as ort
    except ImportError:
        return  # the graph is valid ONNX; no runtime to execute it
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    check(torch.from_numpy(got), gm, x)
