"""The Hessian-block pass against explicit H − G on small float64 models with smooth activations."""
import json
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from obafx.passes.errors import TraceError
from obafx.dump import plot_hessian_blocks
from obafx.passes.hessian_blocks import hessian_blocks, needed_pairs

sys.path.insert(0, os.path.dirname(__file__))
from test_hvp import explicit, make  # noqa: E402


class Reuse(nn.Module):
    """One Linear applied to its own output: its block with itself is a series block."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.lin(self.lin(x)))


class Functional(nn.Module):
    """F.linear with get_attr weights, an additive merge, a mul by a constant and by an input-only tensor."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(3))
        self.w2 = nn.Parameter(torch.randn(3, 4))
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        u = F.linear(x, self.w1, self.b1) * 3.0 * x[:, :3]
        return self.head(u + F.linear(x, self.w2))


def blocks_of(R, hb, model):
    """Each (layer a, layer b) block of the explicit matrix R (ordered like the layers' parameters)."""
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    rows, start = {}, 0
    for layer in hb.layers:
        count = sum(sizes[p] for p in hb.params(layer))
        rows[layer], start = slice(start, start + count), start + count
    return {(a, b): R[rows[a], rows[b]] for a in hb.layers for b in hb.layers}


def check_against_explicit(model, x, y, train=False):
    """Every block called zero is zero in H − G, every block called nonzero is not."""
    hb = hessian_blocks(model, x, train=train)
    _, _, R, _ = explicit(model, x, y, names=[p for layer in hb.layers for p in hb.params(layer)], train=train)
    scale = float(R.abs().max())
    for (a, b), block in blocks_of(R, hb, model).items():
        size = float(block.abs().max()) / scale
        if hb.kind(a, b) == "zero":
            assert size < 1e-12, f"{a}/{b} predicted zero, is {size}"
        else:
            assert size > 1e-8, f"{a}/{b} predicted {hb.kind(a, b)}, is {size}"
    return hb


@pytest.mark.parametrize("name", ["mlp", "res", "cat", "gate", "attn", "sdpa", "mha"])
def test_predicted_blocks_match_explicit_h_minus_g(name):
    model, x, y = make(name)
    check_against_explicit(model, x, y)


class ConvBN(nn.Module):
    """conv -> BN -> pool -> head: BN is affine on running stats, nonlinear on batch statistics."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Linear(3, 3)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


def test_batch_norm_in_eval_and_train_mode():
    torch.manual_seed(0)
    model, x, y = ConvBN().double(), torch.randn(4, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    assert check_against_explicit(model, x, y).kind("conv", "conv") == "zero"
    assert check_against_explicit(model, x, y, train=True).kind("conv", "conv") == "parallel"
    check_against_explicit(*make("res"), train=True)


def test_block_kinds_and_evidence():
    model, x, _ = make("gate")
    hb = hessian_blocks(model, x)
    assert hb.layers == ("a", "b", "g", "fc")
    assert hb.kind("a", "b") == "zero"  # additive merge
    assert hb.kind("a", "a") == "zero"  # enters a product linearly, times a constant
    assert hb.kind("g", "a") == "parallel" and hb.block("a", "g").evidence[0].reason == "product"
    assert hb.kind("g", "g") == "parallel" and hb.block("g", "g").evidence[0].reason == "curvature"
    assert hb.kind("a", "fc") == "series" and hb.block("a", "fc").evidence[0].node == "fc"
    model, x, _ = make("cat")
    assert hessian_blocks(model, x).kind("a", "b") == "zero"  # GELU acts on the pieces separately
    model, x, _ = make("attn")
    hb = hessian_blocks(model, x)
    assert hb.kind("embed", "qkv") == "both" and hb.kind("qkv", "qkv") == "parallel"
    assert {e.reason for e in hb.block("qkv", "qkv").evidence} == {"product", "curvature"}
    assert hb.kind("proj", "proj") == "zero" and hb.kind("head", "proj") == "series"


def test_paper_rules_without_activation_curvature():
    model, x, _ = make("mlp")
    hb = hessian_blocks(model, x, curvature=False)
    assert [hb.kind("fc1", b) for b in hb.layers] == ["zero", "series", "series"]
    assert hb.kind("fc2", "fc2") == "zero"
    model, x, _ = make("attn")
    assert hessian_blocks(model, x, curvature=False).kind("qkv", "qkv") == "parallel"


def test_reused_module_and_functional_layers():
    torch.manual_seed(0)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    hb = check_against_explicit(Reuse().double(), x, y)
    assert hb.kind("lin", "lin") == "series"
    hb = check_against_explicit(Functional().double(), x, y)
    assert hb.layers == ("w1", "w2", "head") and hb.params("w1") == ("w1", "b1")
    assert hb.kind("w1", "w2") == "zero" and hb.kind("w1", "w1") == "zero"


def test_outputs_text_dict_plot(tmp_path):
    model, x, _ = make("gate")
    hb = hessian_blocks(model, x)
    data = json.loads(json.dumps(hb.to_dict()))
    assert data["layers"] == list(hb.layers) and data["layer_params"]["fc"] == ["fc.weight", "fc.bias"]
    assert {(b["a"], b["b"]) for b in data["blocks"]} == set(hb.nonzero_pairs()) == set(needed_pairs(hb))
    lines = hb.to_text().splitlines()
    assert lines[2].split()[1:] == [".", ".", "P", "S", "a"] and lines[-1].endswith("fc")
    pytest.importorskip("matplotlib")
    path = plot_hessian_blocks(hb, str(tmp_path / "blocks.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_untraceable_model_raises_trace_error_and_leaf_modules_help():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.head = Branchy(), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.inner(x))
    x = torch.randn(3, 4)
    with pytest.raises(TraceError, match="leaf_modules"):
        hessian_blocks(Outer(), x)
    hb = hessian_blocks(Outer(), x, leaf_modules=["inner"])
    assert hb.layers == ("inner", "head") and hb.kind("inner", "inner") == "parallel"  # opaque: assumed
    assert hb.block("inner", "inner").evidence[-1].reason == "unknown"
