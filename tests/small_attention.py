"""Small attention models (nn.MultiheadAttention, hand-written multi-head attention) and the `Case` record
shared by the small-model zoo (imported by tests; not collected)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random affine parameters and running statistics for every norm (so a wrong index cannot hide behind the
    default init), random PReLU slopes; float64, eval mode."""
    g = torch.Generator().manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for m in model.modules():
            for name in ("weight", "bias"):
                p = getattr(m, name, None)
                is_norm = isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm))
                if isinstance(p, torch.Tensor) and (is_norm or isinstance(m, nn.PReLU)):
                    p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5 if name == "weight"
                            else torch.randn(p.shape, generator=g, dtype=p.dtype))
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=torch.float64))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=torch.float64) + 0.5)
    return model.eval()


@dataclass(frozen=True)
class Case:
    """``make()`` builds the model; ``inputs(batch)`` gives its positional inputs as a tuple; ``exact``: masking
    equivalence holds to round-off; ``prunable``: some channel can be removed."""

    cls: Callable[[], nn.Module]
    input_fn: Callable[[int], torch.Tensor]
    exact: bool = True
    prunable: bool = True

    def make(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return randomise(self.cls(), seed)

    def inputs(self, batch: int = 2, seed: int = 0):
        torch.manual_seed(1000 + seed + batch)
        x = self.input_fn(batch)
        return x if isinstance(x, tuple) else (x,)


class MhaNet(nn.Module):
    """Linear -> nn.MultiheadAttention (self-attention) -> Linear -> Linear, batch_first either way. Whole heads
    go with the input channels of the same block (see rules_layers.multihead_attention); out_proj's rows and the
    MLP after it shrink freely."""

    def __init__(self, batch_first: bool = True):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.att = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.mid, self.out = nn.Linear(16, 12), nn.Linear(12, 3)

    def forward(self, x):
        h = F.relu(self.inp(x))
        a, _ = self.att(h, h, h)
        return self.out(F.relu(self.mid(a)))


class HandAttention(nn.Module):
    """timm-style attention: packed qkv Linear, reshape into heads (a literal head count, or -1), q @ kᵀ,
    softmax, @ v, transpose, reshape, proj; inside a residual block between two Linear layers."""

    def __init__(self, heads_literal: bool = True, dim: int = 16, heads: int = 4, unbind: bool = False):
        super().__init__()
        self.literal, self.heads, self.head_dim, self.unbind = heads_literal, heads, dim // heads, unbind
        self.scale = self.head_dim ** -0.5
        self.inp, self.qkv, self.proj, self.out = nn.Linear(6, dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, 3)

    def forward(self, x):
        x = self.inp(x)
        b, n, c = x.shape
        h = self.heads if self.literal else -1
        qkv = self.qkv(x).reshape(b, n, 3, h, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0) if self.unbind else (qkv[0], qkv[1], qkv[2])
        att = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, n, -1)
        return self.out(x + self.proj(y))


class SdpaAttention(nn.Module):
    """Separate q/k/v Linear layers, heads via view(B, N, H, D).transpose, F.scaled_dot_product_attention with
    the default scale (1/sqrt(head_dim): the head dim of q/k must not shrink, or the scale would change)."""

    def __init__(self, dim: int = 16, heads: int = 4):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.inp, self.out = nn.Linear(6, dim), nn.Linear(dim, 3)

    def forward(self, x):
        x = self.inp(x)
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, self.h, self.d).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, self.h * self.d)
        return self.out(x + self.o(y))


class DynamicScaleAttention(nn.Module):
    """The annotated-transformer scale ``/ math.sqrt(q.size(-1))``: the q/k head dim must stay (the number is
    measured on it); v and the rest may shrink."""

    def __init__(self, dim: int = 16, heads: int = 4):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.inp, self.out = nn.Linear(6, dim), nn.Linear(dim, 3)

    def forward(self, x):
        x = self.inp(x)
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, self.h, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)), dim=-1)
        return self.out(x + self.o((att @ v).transpose(1, 2).reshape(b, n, -1)))


ATTENTION_CASES = {
    "mha_batch_first": Case(lambda: MhaNet(True), lambda b: randn(b, 5, 6)),
    "mha_seq_first": Case(lambda: MhaNet(False), lambda b: randn(5, b, 6)),
    "attention_literal_heads": Case(lambda: HandAttention(True), lambda b: randn(b, 5, 6)),
    "attention_minus_one_heads": Case(lambda: HandAttention(False), lambda b: randn(b, 5, 6)),
    "attention_unbind": Case(lambda: HandAttention(False, unbind=True), lambda b: randn(b, 5, 6)),
    "attention_sdpa": Case(SdpaAttention, lambda b: randn(b, 5, 6)),
    "attention_dynamic_scale": Case(DynamicScaleAttention, lambda b: randn(b, 5, 6)),
}
