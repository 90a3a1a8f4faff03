"""Random but valid architectures for property-based fuzzing (a hypothesis strategy; not a test module).

A *spec* is plain data (dicts, ints, strings) fixed at construction; `SpecNet(spec)` builds the modules and its
forward walks the spec, so fx traces it (control flow over the spec is Python constants, never tensor values).

Image part (N, C, H, W): conv (grouped, optional BN/activation), depthwise conv, residual blocks, concatenation,
chunk/split/slice, SE-style gating, free scales, BatchNorm/GroupNorm, a module called twice, max-pooling. Head:
global pool into linears, flatten into a linear, or tokens (N, HW, C) with a class token, hand-written multi-head
attention (qkv reshape with literal or dynamic sizes) and MLP blocks with LayerNorm. Widths are drawn in 4..24
with divisibility (groups, heads) built in. The oracles live in tests/test_fuzz.py (`check_case`), shared with
benchmarks/fuzz.py.
"""
from __future__ import annotations

from typing import Any, Dict, List

import hypothesis.strategies as st
import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGE_BLOCKS = ("conv", "dw", "res", "cat", "glu", "split", "slice", "se", "scale", "norm", "shared", "pool")
TOKEN_BLOCKS = ("attn", "mlp")
ACTS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "none": lambda t: t}

# ------------------------------------------------------------------------------------------------ strategy


def _width(draw, multiple: int = 1, lo: int = 4, hi: int = 24) -> int:
    """A width in [lo, hi] that is a multiple of ``multiple``."""
    return multiple * draw(st.integers(max(1, -(-lo // multiple)), max(1, hi // multiple)))


def _divisor(draw, c: int) -> int:
    return draw(st.sampled_from([g for g in (1, 2, 4) if c % g == 0]))


def _image_block(draw, kind: str, c: int, size: int) -> Dict[str, Any]:
    """One image block's spec; every block records its output width in "out" (and "size" when it changes)."""
    act = draw(st.sampled_from(sorted(ACTS)))
    if kind == "conv":
        g = _divisor(draw, c)
        return dict(kind=kind, groups=g, out=_width(draw, g), k=draw(st.sampled_from([1, 3])), act=act,
                    bn=draw(st.booleans()), bias=draw(st.booleans()))
    if kind == "res":
        return dict(kind=kind, mid=_width(draw), bn=draw(st.booleans()), act=act, out=c)
    if kind == "cat":
        return dict(kind=kind, a=_width(draw, hi=12), b=_width(draw, hi=12), keep_input=draw(st.booleans()), act=act)
    if kind == "glu":
        half = _width(draw, hi=12)
        return dict(kind=kind, half=half, how=draw(st.sampled_from(["chunk", "split"])), out=half)
    if kind == "split":
        p, q = _width(draw, hi=12), _width(draw, hi=12)
        return dict(kind=kind, p=p, q=q, out=p + q)
    if kind == "slice":
        w = _width(draw, lo=6)
        return dict(kind=kind, w=w, s=draw(st.integers(2, w - 2)), out=w)
    if kind == "se":
        return dict(kind=kind, r=_width(draw, hi=12), view=draw(st.booleans()), out=c)
    if kind == "norm":
        return dict(kind=kind, norm=draw(st.sampled_from(["bn", "gn"])), groups=_divisor(draw, c), out=c)
    if kind == "pool":
        return dict(kind=kind, out=c, size=size // 2)
    return dict(kind=kind, act=act, out=c)  # dw, scale, shared keep the width


def _token_block(draw, kind: str) -> Dict[str, Any]:
    if kind == "attn":
        return dict(kind=kind, heads=draw(st.sampled_from([1, 2])), dim=draw(st.integers(2, 8)),
                    ln=draw(st.booleans()), literal=draw(st.booleans()), sdpa=draw(st.booleans()))
    return dict(kind=kind, hidden=_width(draw), ln=draw(st.booleans()))  # mlp


@st.composite
def architectures(draw) -> Dict[str, Any]:
    """A spec dict: input shape, stem width, image blocks, head (with token blocks for a "tokens" head)."""
    in_ch, size = draw(st.integers(1, 3)), draw(st.sampled_from([4, 6, 8]))
    c = _width(draw)
    spec: Dict[str, Any] = dict(in_ch=in_ch, size=size, stem=c, classes=draw(st.integers(3, 6)), blocks=[])
    for kind in draw(st.lists(st.sampled_from(IMAGE_BLOCKS), min_size=1, max_size=4)):
        if kind == "pool" and size < 4:
            continue
        block = _image_block(draw, kind, c, size)
        if kind == "cat":
            block["out"] = block["a"] + block["b"] + (c if block["keep_input"] else 0)
        spec["blocks"].append(block)
        c, size = block["out"], block.get("size", size)
    head = draw(st.sampled_from(["gap", "flatten", "tokens", "tokens"]))  # tokens carry most of the op variety
    spec["head"] = dict(kind=head, hidden=draw(st.one_of(st.none(), st.integers(4, 24))))
    if head == "tokens":
        spec["head"].update(cls=draw(st.booleans()), final_ln=draw(st.booleans()),
                            blocks=[_token_block(draw, k) for k in draw(st.lists(st.sampled_from(TOKEN_BLOCKS),
                                                                                   max_size=3))])
    return spec


def budgets():
    """("macs", fraction to keep in [0.3, 1]) or ("channels", fraction to remove in [0, 0.8])."""
    return st.one_of(st.tuples(st.just("macs"), st.floats(0.3, 1.0)),
                     st.tuples(st.just("channels"), st.floats(0.0, 0.8)))


@st.composite
def cases(draw) -> Dict[str, Any]:
    """A whole fuzz case: architecture, budget, criterion, steps and the seed of the weights."""
    kind, value = draw(budgets())
    return dict(spec=draw(architectures()), budget={kind: value},
                importance=draw(st.sampled_from(["magnitude", "random", "oba"])),
                steps=draw(st.sampled_from([1, 2])), seed=draw(st.integers(0, 2 ** 16)))


def mixes_channels(spec: Dict[str, Any]) -> bool:
    """GroupNorm/LayerNorm normalise over channels: masking is then not exact (pruned channels move statistics)."""
    norms = [b for b in spec["blocks"] if b["kind"] == "norm" and b["norm"] == "gn"]
    head = spec["head"]
    lns = head.get("final_ln") or any(b.get("ln") for b in head.get("blocks", []))
    return bool(norms) or bool(lns)


# ------------------------------------------------------------------------------------------------ modules

class SpecNet(nn.Module):
    """The network a spec describes. Float64 and eval mode are left to the caller."""

    def __init__(self, spec: Dict[str, Any]):
        super().__init__()
        self.spec = spec
        c = spec["stem"]
        self.stem = nn.Conv2d(spec["in_ch"], c, 3, padding=1)
        self.blocks = nn.ModuleList()
        self.free = nn.ParameterList()
        for b in spec["blocks"]:
            self.blocks.append(self._image_modules(b, c))
            c = b["out"]
        self.head = self._head_modules(spec["head"], c, _final_size(spec), spec["classes"])

    def _image_modules(self, b: Dict[str, Any], c: int) -> nn.ModuleDict:
        k = b["kind"]
        if k == "conv":
            mods = dict(conv=nn.Conv2d(c, b["out"], b["k"], padding=b["k"] // 2, groups=b["groups"], bias=b["bias"]))
            if b["bn"]:
                mods["bn"] = nn.BatchNorm2d(b["out"])
            return nn.ModuleDict(mods)
        if k == "dw":
            return nn.ModuleDict(dict(conv=nn.Conv2d(c, c, 3, padding=1, groups=c)))
        if k == "res":
            mods = dict(a=nn.Conv2d(c, b["mid"], 3, padding=1), b=nn.Conv2d(b["mid"], c, 1))
            if b["bn"]:
                mods["bn"] = nn.BatchNorm2d(c)
            return nn.ModuleDict(mods)
        if k == "cat":
            return nn.ModuleDict(dict(a=nn.Conv2d(c, b["a"], 1), b=nn.Conv2d(c, b["b"], 3, padding=1)))
        if k in ("glu", "split", "slice"):
            out = {"glu": 2 * b.get("half", 0), "split": b.get("p", 0) + b.get("q", 0), "slice": b.get("w", 0)}[k]
            return nn.ModuleDict(dict(conv=nn.Conv2d(c, out, 1)))
        if k == "se":
            return nn.ModuleDict(dict(down=nn.Linear(c, b["r"]), up=nn.Linear(b["r"], c)))
        if k == "scale":
            self.free.append(nn.Parameter(torch.rand(1, c, 1, 1) + 0.5))
            return nn.ModuleDict()
        if k == "norm":
            return nn.ModuleDict(dict(norm=nn.BatchNorm2d(c) if b["norm"] == "bn" else nn.GroupNorm(b["groups"], c)))
        if k == "shared":
            return nn.ModuleDict(dict(conv=nn.Conv2d(c, c, 3, padding=1)))
        return nn.ModuleDict()  # pool

    def _head_modules(self, h: Dict[str, Any], c: int, size: int, classes: int) -> nn.ModuleDict:
        hidden = h["hidden"]
        feats = c * size * size if h["kind"] == "flatten" else c
        mods: Dict[str, nn.Module] = {}
        if h["kind"] == "tokens":
            if h["cls"]:
                self.cls_token = nn.Parameter(torch.randn(1, 1, c))
            mods["tok"] = nn.ModuleList([_token_modules(b, c) for b in h["blocks"]])
            if h["final_ln"]:
                mods["ln"] = nn.LayerNorm(c)
        if hidden:
            mods["fc1"], mods["fc2"] = nn.Linear(feats, hidden), nn.Linear(hidden, classes)
        else:
            mods["fc2"] = nn.Linear(feats, classes)
        return nn.ModuleDict(mods)

    def forward(self, x):
        x = self.stem(x)
        scales = iter(self.free)
        for b, m in zip(self.spec["blocks"], self.blocks):
            x = _run_image(b, m, x, scales)
        return self._run_head(self.spec["head"], x)

    def _run_head(self, h: Dict[str, Any], x):
        m = self.head
        if h["kind"] == "gap":
            x = x.mean((2, 3))
        elif h["kind"] == "flatten":
            x = torch.flatten(x, 1)
        else:
            x = x.flatten(2).transpose(1, 2)  # (N, HW, C)
            if h["cls"]:
                x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            for b, tm in zip(h["blocks"], m["tok"]):
                x = _run_token(b, tm, x)
            if h["final_ln"]:
                x = m["ln"](x)
            x = x[:, 0] if h["cls"] else x.mean(1)
        if "fc1" in m:
            x = F.gelu(m["fc1"](x))
        return m["fc2"](x)


def _final_size(spec: Dict[str, Any]) -> int:
    size = spec["size"]
    for b in spec["blocks"]:
        size = b.get("size", size)
    return size


def _token_modules(b: Dict[str, Any], c: int) -> nn.ModuleDict:
    mods: Dict[str, nn.Module] = {"ln": nn.LayerNorm(c)} if b["ln"] else {}
    if b["kind"] == "attn":
        inner = b["heads"] * b["dim"]
        mods.update(qkv=nn.Linear(c, 3 * inner), proj=nn.Linear(inner, c))
    else:
        mods.update(fc1=nn.Linear(c, b["hidden"]), fc2=nn.Linear(b["hidden"], c))
    return nn.ModuleDict(mods)


def _run_image(b: Dict[str, Any], m: nn.ModuleDict, x, scales):
    k, act = b["kind"], ACTS[b.get("act", "none")]
    if k == "conv":
        y = m["conv"](x)
        return act(m["bn"](y) if "bn" in m else y)
    if k == "dw":
        return act(m["conv"](x))
    if k == "res":
        y = m["b"](F.relu(m["a"](x)))
        return act((m["bn"](y) if "bn" in m else y) + x)
    if k == "cat":
        parts = [act(m["a"](x)), m["b"](x)] + ([x] if b["keep_input"] else [])
        return torch.cat(parts, dim=1)
    if k == "glu":
        y = m["conv"](x)
        a, g = y.chunk(2, dim=1) if b["how"] == "chunk" else torch.split(y, [b["half"], b["half"]], dim=1)
        return a * torch.sigmoid(g)
    if k == "split":
        p, q = m["conv"](x).split([b["p"], b["q"]], dim=1)
        return torch.cat([F.relu(p), torch.tanh(q)], dim=1)
    if k == "slice":
        y = m["conv"](x)
        return torch.cat([y[:, :b["s"]], 2.0 * y[:, b["s"]:]], dim=1)
    if k == "se":
        s = torch.sigmoid(m["up"](F.relu(m["down"](x.mean((2, 3))))))
        return x * (s.view(-1, b["out"], 1, 1) if b["view"] else s[:, :, None, None])
    if k == "scale":
        return x * next(scales)
    if k == "norm":
        return m["norm"](x)
    if k == "shared":
        return m["conv"](act(m["conv"](x)))  # one module called twice
    return F.max_pool2d(x, 2)


def _run_token(b: Dict[str, Any], m: nn.ModuleDict, x):
    h = m["ln"](x) if "ln" in m else x
    if b["kind"] == "mlp":
        return x + m["fc2"](F.gelu(m["fc1"](h)))
    heads, dim = b["heads"], b["dim"]
    n, t = (-1, x.shape[1]) if b["literal"] else (x.shape[0], x.shape[1])
    qkv = m["qkv"](h).reshape(n, t, 3, heads, dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if b["sdpa"]:
        mixed = F.scaled_dot_product_attention(q, k, v)
    else:
        mixed = torch.softmax(q @ k.transpose(-2, -1) * dim ** -0.5, dim=-1) @ v
    out = mixed.transpose(1, 2).reshape(n, t, heads * dim)
    return x + m["proj"](out)


def build(spec: Dict[str, Any], seed: int) -> nn.Module:
    """SpecNet in float64 and eval mode, with randomised BatchNorm statistics/affines (so wrong indices show)."""
    torch.manual_seed(seed)
    model = SpecNet(spec).double()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-1, 1)
                mod.running_var.uniform_(0.5, 2)
            if isinstance(mod, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                mod.weight.uniform_(0.5, 2)
                mod.bias.uniform_(-0.5, 0.5)
    return model.eval()


def example_input(spec: Dict[str, Any], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, spec["in_ch"], spec["size"], spec["size"], generator=gen, dtype=torch.float64)


def describe(spec: Dict[str, Any]) -> List[str]:
    """Short names of the blocks, for counting which ops the fuzzer exercised."""
    head = spec["head"]
    return [b["kind"] for b in spec["blocks"]] + [f"head:{head['kind']}"] + \
        [f"tok:{b['kind']}" for b in head.get("blocks", [])]
