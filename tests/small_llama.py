"""LLaMA-style decoder blocks written in plain torch, the way Hugging Face writes them (imported by tests; not
collected): separate q/k/v/o projections without bias, grouped-query attention (k/v heads repeated with
``repeat_interleave`` or HF's ``expand + reshape`` repeat_kv), rotary embeddings computed from an ``inv_freq``
buffer and applied with ``rotate_half`` (slices of ``x.shape[-1] // 2`` and a cat), RMSNorm (``nn.RMSNorm`` or
hand-written), a SwiGLU MLP, tied residual stream.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Config:
    vocab: int = 40
    dim: int = 32
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8
    hidden: int = 48
    layers: int = 2
    repeat: str = "expand"  # "expand" (HF repeat_kv), "interleave" (repeat_interleave) or "sdpa" (enable_gqa)
    norm: str = "module"  # "module" (nn.RMSNorm), "functional" (F.rms_norm) or "hand"
    literal_heads: bool = False  # view(b, n, heads, head_dim) instead of view(b, n, -1, head_dim)


class HandRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class FunctionalRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.dim, self.eps = nn.Parameter(torch.ones(dim)), dim, eps

    def forward(self, x):
        return F.rms_norm(x, (self.dim,), self.weight, self.eps)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(x, n_rep: int):
    """HF's repeat_kv: (b, kv_heads, n, d) -> (b, kv_heads * n_rep, n, d) by expand + reshape."""
    b, kv, n, d = x.shape
    x = x[:, :, None, :, :].expand(b, kv, n_rep, n, d)
    return x.reshape(b, kv * n_rep, n, d)


class Rotary(nn.Module):
    """HF LlamaRotaryEmbedding: cos/sin of positions times inv_freq, the frequencies repeated for both halves
    (an outer product by broadcasting: fx does not proxy buffers, so HF's ``inv_freq[None, :, None]`` would be
    evaluated at trace time into a constant)."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x, position_ids):
        freqs = position_ids[:, :, None].to(x.dtype) * self.inv_freq  # (b, n, head_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c, self.n_rep, self.scaling = c, c.heads // c.kv_heads, c.head_dim ** -0.5
        self.q_proj = nn.Linear(c.dim, c.heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.dim, c.kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.dim, c.kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.heads * c.head_dim, c.dim, bias=False)

    def _heads(self, x, heads: int):
        b, n, _ = x.shape
        return x.view(b, n, heads if self.c.literal_heads else -1, self.c.head_dim).transpose(1, 2)

    def forward(self, x, cos, sin, mask):
        b, n, _ = x.shape
        q, k = self._heads(self.q_proj(x), self.c.heads), self._heads(self.k_proj(x), self.c.kv_heads)
        v = self._heads(self.v_proj(x), self.c.kv_heads)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if self.c.repeat == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=True)
        else:
            if self.c.repeat == "interleave":  # method and function forms
                k, v = k.repeat_interleave(self.n_rep, dim=1), torch.repeat_interleave(v, self.n_rep, dim=1)
            else:
                k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)
            att = F.softmax(torch.matmul(q, k.transpose(2, 3)) * self.scaling + mask, dim=-1)
            y = torch.matmul(att, v)
        return self.o_proj(y.transpose(1, 2).reshape(b, n, -1))


class SwiGLU(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.dim, c.hidden, bias=False)
        self.up_proj = nn.Linear(c.dim, c.hidden, bias=False)
        self.down_proj = nn.Linear(c.hidden, c.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _norm(c: Config) -> nn.Module:
    return {"module": lambda: nn.RMSNorm(c.dim, eps=1e-6), "functional": lambda: FunctionalRMSNorm(c.dim),
            "hand": lambda: HandRMSNorm(c.dim)}[c.norm]()


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.input_layernorm, self.self_attn = _norm(c), Attention(c)
        self.post_attention_layernorm, self.mlp = _norm(c), SwiGLU(c)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLlama(nn.Module):
    """Token embedding, ``layers`` blocks, final RMSNorm, lm_head; a causal mask built from the length."""

    def __init__(self, c: Config = Config()):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab, c.dim)
        self.rotary = Rotary(c.head_dim)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm, self.lm_head = _norm(c), nn.Linear(c.dim, c.vocab, bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        n = ids.shape[1]
        position_ids = torch.arange(n, device=ids.device)[None, :].expand(ids.shape[0], -1)
        cos, sin = self.rotary(x, position_ids)
        mask = torch.full((n, n), float("-inf"), dtype=x.dtype, device=x.device).triu(1)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.norm(x))


def make(c: Config = Config(), seed: int = 0) -> TinyLlama:
    """A float64 TinyLlama in eval mode with random RMSNorm weights."""
    torch.manual_seed(seed)
    model = TinyLlama(c).double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.RMSNorm, HandRMSNorm, FunctionalRMSNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, dtype=torch.float64) + 0.5)
    return model


def ids(batch: int = 2, length: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, Config().vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
