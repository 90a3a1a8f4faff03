"""obafx.bench.models: every registered model runs, traces with torch.fx and matches its eager output."""
import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from obafx.bench import models
from obafx.passes.errors import ConfigError


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tests/conftest.py

# Narrow versions keep the test fast; the structure (and so the traced graph's shape) is the same.
SMALL = {
    "resnet20": dict(width=4),
    "resnet56": dict(width=4),
    "vgg_bn": dict(cfg=(8, "M", 16, "M", 16, "M"), hidden=16),
    "vit_tiny": dict(dim=24, depth=2, heads=3),
}


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_forward_trace_and_equal_outputs(name):
    torch.manual_seed(0)
    model = models.build(name, **SMALL[name]).eval()
    x = torch.randn(3, 1, 32, 32)
    eager = model(x)
    assert eager.shape == (3, 10) and torch.isfinite(eager).all()
    gm = fx.symbolic_trace(model)
    torch.testing.assert_close(gm(x), eager, rtol=0, atol=0)
    # the traced graph must also serve another batch size (no batch size baked in)
    torch.testing.assert_close(gm(x[:2]), model(x[:2]), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_default_sizes_forward(name):
    model = models.build(name, num_classes=7, in_ch=3).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_resnet_depths_and_option_b_shortcuts():
    for builder, n_blocks in ((models.resnet20, 9), (models.resnet56, 27)):
        model = builder()
        blocks = [m for m in model.modules() if isinstance(m, models.BasicBlock)]
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert len(blocks) == n_blocks
        assert len(convs) == 1 + 2 * n_blocks + 2  # stem, block convs, two 1x1 downsample convs
        down = [b for b in blocks if len(b.shortcut)]
        assert [b.shortcut[0].kernel_size for b in down] == [(1, 1), (1, 1)]
    assert models.resnet20(width=32).fc.in_features == 128


def test_vit_heads_follow_tensor_not_attribute():
    """Pruning a head slices qkv/proj; the forward must keep working with no attribute updated."""
    torch.manual_seed(0)
    model = models.vit_tiny(dim=24, depth=1, heads=3).eval()
    attn = model.blocks[0].attn
    assert attn.head_dim == 8
    # keep heads 0 and 2 of q, k and v: rows [0:8, 16:24] of each of the three 24-row chunks
    keep = torch.cat([torch.cat([torch.arange(0, 8), torch.arange(16, 24)]) + 24 * i for i in range(3)])
    out_keep = torch.cat([torch.arange(0, 8), torch.arange(16, 24)])
    qkv, proj = attn.qkv, attn.proj
    attn.qkv = nn.Linear(24, 48)
    attn.qkv.weight.data, attn.qkv.bias.data = qkv.weight.data[keep], qkv.bias.data[keep]
    attn.proj = nn.Linear(16, 24)
    attn.proj.weight.data, attn.proj.bias.data = proj.weight.data[:, out_keep], proj.bias.data
    x = torch.randn(2, 1, 32, 32)
    assert model(x).shape == (2, 10)
    torch.testing.assert_close(fx.symbolic_trace(model)(x), model(x))


def test_build_errors():
    with pytest.raises(ConfigError, match="unknown model"):
        models.build("resnet18")
    with pytest.raises(ConfigError, match="bad arguments"):
        models.build("resnet20", depth=3)
    with pytest.raises(ConfigError, match="divisible"):
        models.vit_tiny(dim=100, heads=3)
    with pytest.raises(ConfigError, match="cfg"):
        models.vgg_bn(cfg=("M",) * 6 + (8,))
