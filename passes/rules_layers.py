"""Op rules for layers with parameters (conv, linear, norms, embedding, attention) and for matmul.

A rule couples the input's channel planes with the layer's input-channel slot, gives the output a plane of the
layer's output-channel slot, and records every parameter slice that must go with a channel.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .call import Call, out_planes
from .labels import Plane, along, pin_all, shifted, squeeze_to_dims


def couple_dim(call: Call, planes: Sequence[Plane], dim: int, slots: Sequence[Optional[np.ndarray]]) -> None:
    """Union every plane covering ``dim`` with each slot's labels along ``dim``; a slot facing an unlabelled
    (fixed-width) dim is pinned, and so are planes facing a fixed-width slot."""
    n = call.x.dim()
    hits = along(planes, dim)
    present = [s for s in slots if s is not None]
    for s in present:
        shape = [1] * n
        shape[dim] = s.shape[0]
        for p in hits:
            call.store.union(p.arr, s.reshape(shape))
        if not hits:
            call.store.pin(s)
    if not present:
        for p in hits:
            call.store.pin(p.arr)


def _channel_dim_only(call: Call, dim: int) -> Tuple[Plane, ...]:
    """Planes not covering ``dim`` cannot pass a layer that mixes positions (conv): pin them."""
    rest = [p for p in call.lx if dim not in p.dims]
    pin_all(call.store, rest)
    return tuple(p for p in call.lx if dim in p.dims)


def conv(call: Call):
    """Conv1d/2d/3d and F.conv*d (weight [O, I/g, *k]): channels on dim 1, grouped and depthwise included."""
    groups = call.module.groups if call.module is not None else call.arg(6, "groups", 1)
    hits = _channel_dim_only(call, 1)
    w_out = call.param(1, "weight", "weight", 0, "out")
    w_in = call.param(1, "weight", "weight", 1, "in")
    bias = call.param(2, "bias", "bias", 0, "out")
    if w_out is not None and bias is not None:
        call.store.union(bias, w_out)
    if groups == 1:
        couple_dim(call, hits, 1, [w_in])
    else:
        _couple_grouped(call, hits, groups, w_in, w_out)
    return out_planes(w_out, call.out.dim(), 1)


def _couple_grouped(call: Call, hits, groups: int, w_in, w_out) -> None:
    """Grouped conv: every group keeps the same within-group indices, so ``groups`` stays valid.
    Depthwise (one input channel per group): input channel c goes with its output channels."""
    in_channels = call.x.shape[1]
    in_lab = None
    for p in hits:
        if p.dims == (1,):
            in_lab = p.arr.reshape(-1) if in_lab is None else in_lab
            call.store.union(p.arr.reshape(-1), in_lab)
        else:
            call.store.pin(p.arr)
    if w_in is not None:
        call.store.pin(w_in) if w_in.shape[0] == 1 else None
    if w_out is None or in_lab is None:
        if w_out is not None:
            call.store.pin(w_out)
        if in_lab is not None:
            call.store.pin(in_lab)
        return
    per_in = in_channels // groups
    per_out = w_out.shape[0] // groups
    if per_in == 1:
        call.store.union(w_out.reshape(groups, per_out), in_lab.reshape(groups, 1))
        return
    grid_in = in_lab.reshape(groups, per_in)
    call.store.union(grid_in, grid_in[:1])
    call.store.union(grid_in[:1].reshape(-1), w_in)
    grid_out = w_out.reshape(groups, per_out)
    call.store.union(grid_out, grid_out[:1])


def conv_transpose(call: Call):
    """ConvTranspose (weight [I, O/g, *k]) with groups == 1; grouped transposed convs are barriers."""
    if call.module.groups != 1:
        pin_all(call.store, call.lx)
        call.store.barrier(call.node.name, "grouped ConvTranspose")
        return ()
    hits = _channel_dim_only(call, 1)
    w_in = call.param(1, "weight", "weight", 0, "in")
    w_out = call.param(1, "weight", "weight", 1, "out")
    bias = call.param(2, "bias", "bias", 0, "out")
    if bias is not None:
        call.store.union(bias, w_out)
    couple_dim(call, hits, 1, [w_in])
    return out_planes(w_out, call.out.dim(), 1)


def linear(call: Call):
    """Linear / F.linear on N-D input (weight [O, I]): the last dim; other dims' planes pass through."""
    n = call.x.dim()
    w_out = call.param(1, "weight", "weight", 0, "out")
    w_in = call.param(1, "weight", "weight", 1, "in")
    bias = call.param(2, "bias", "bias", 0, "out")
    if w_out is not None and bias is not None:
        call.store.union(bias, w_out)
    couple_dim(call, call.lx, n - 1, [w_in])
    keep = [p for p in call.lx if n - 1 not in p.dims]
    return out_planes(w_out, n, n - 1, keep)


def batch_norm(call: Call):
    """BatchNorm / InstanceNorm(affine) / F.batch_norm: per-channel statistics and affine on dim 1."""
    if call.module is not None:
        names = ["weight", "bias", "running_mean", "running_var"]
        slots = [call.param(0, n, n, 0, "through") for n in names]
    else:
        slots = [call.param(i, n, n, 0, "through") for i, n in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]
    couple_dim(call, call.lx, 1, slots)
    return call.lx


def layer_norm(call: Call):
    """LayerNorm over the last dim (normalized over more dims: those dims are pinned)."""
    shape = call.module.normalized_shape if call.module is not None else call.arg(1, "normalized_shape")
    n = call.x.dim()
    if len(tuple(shape)) != 1:
        normed = set(range(n - len(tuple(shape)), n))
        pin_all(call.store, [p for p in call.lx if set(p.dims) & normed])
        return tuple(p for p in call.lx if not set(p.dims) & normed)
    slots = [call.param(2, "weight", "weight", 0, "through"), call.param(3, "bias", "bias", 0, "through")]
    couple_dim(call, call.lx, n - 1, slots)
    return call.lx


def group_norm(call: Call):
    """GroupNorm(G, C): every group keeps the same within-group indices so that G stays valid."""
    groups = call.module.num_groups if call.module is not None else call.arg(1, "num_groups")
    for p in along(call.lx, 1):
        grid = p.arr.reshape(p.arr.shape[:1] + (groups, -1) + p.arr.shape[2:])
        call.store.union(grid, np.take(grid, [0], axis=1))
    slots = [call.param(2, "weight", "weight", 0, "through"), call.param(3, "bias", "bias", 0, "through")]
    couple_dim(call, call.lx, 1, slots)
    return call.lx


def prelu(call: Call):
    """PReLU with one slope per channel (dim 1); a single shared slope needs nothing."""
    weight = call.param(1, "weight", "weight", 0, "through")
    if weight is not None and weight.shape[0] > 1:
        couple_dim(call, call.lx, 1, [weight])
    return call.lx


def embedding(call: Call):
    """Embedding: the output's last dim is the weight's dim 1; indices carry no channels."""
    pin_all(call.store, call.lx)
    return out_planes(call.param(1, "weight", "weight", 1, "out"), call.out.dim(), call.out.dim() - 1)


def multihead_attention(call: Call):
    """nn.MultiheadAttention with packed in_proj: embed_dim shrinks by the same head-dim indices in every
    head, so num_heads stays and head_dim = embed_dim / num_heads stays an integer."""
    m = call.module
    if not m._qkv_same_embed_dim or m.in_proj_weight is None:
        pin_all(call.store, [p for lv in call.largs[:3] for p in (lv or ())])
        call.store.barrier(call.node.name, "MultiheadAttention with separate kdim/vdim")
        return ((), ())
    e, h = m.embed_dim, m.num_heads
    cols = call.param(0, "", "in_proj_weight", 1, "in")
    rows = call.param(0, "", "in_proj_weight", 0, "out")
    store = call.store
    grid = rows.reshape(3, h, e // h)
    store.union(grid, grid[:1, :1])  # q, k, v and every head share the head-dim index
    store.union(cols.reshape(h, -1), grid[0, :1])
    for slot in (call.param(0, "", "in_proj_bias", 0, "out"), store_out(call, "out_proj.weight", 0, "out"),
                 store_out(call, "out_proj.weight", 1, "in"), store_out(call, "out_proj.bias", 0, "out")):
        if slot is not None:
            store.union(slot, cols)
    for i in range(3):
        value = call.arg(i, ("query", "key", "value")[i])
        if isinstance(value, torch.Tensor):
            last = value.dim() - 1
            labels = call.larg(i, ("query", "key", "value")[i]) or ()
            couple_dim(_Shim(call, value), labels, last, [cols])
            pin_all(store, [p for p in labels if last not in p.dims])
    attn = call.out[0]
    return (out_planes(cols, attn.dim(), attn.dim() - 1), ())


class _Shim:
    """A Call whose ``x`` is another argument (couple_dim reads the rank from ``call.x``)."""

    def __init__(self, call: Call, x: torch.Tensor):
        self.store, self.x = call.store, x


def store_out(call: Call, qualname: str, dim: int, role: str) -> Optional[np.ndarray]:
    """Labels of a nested parameter of the called module (e.g. MultiheadAttention's out_proj.weight)."""
    tensor = call.module.get_parameter(qualname) if qualname in dict(call.module.named_parameters()) else None
    if tensor is None:
        return None
    return call.store.slot(f"{call.node.target}.{qualname}", dim, tensor.shape[dim], role, call.owner())


def matmul_planes(store, sa, pa, sb, pb) -> Tuple[Plane, ...]:
    """A @ B with A [..., n, k] and B [..., k, m] (both at least 2-D): the contracted dim couples A's and B's
    labels index by index; a plane spanning k and batch dims (attention heads) merges along k into a per-head
    label; batch dims couple like an elementwise op."""
    r = max(len(sa), len(sb))
    sa, sb = (1,) * (r - len(sa)) + tuple(sa), (1,) * (r - len(sb)) + tuple(sb)
    pa, pb = [shifted(p, r) for p in pa], [shifted(p, r) for p in pb]
    ka, kb = r - 1, r - 2
    a_k = [_fold(store, p, keep=ka, drop=r - 2) for p in pa if ka in p.dims]
    b_k = [_fold(store, p, keep=kb, drop=r - 1) for p in pb if kb in p.dims]
    for p in a_k:
        partners = [q.arr.swapaxes(-1, -2) for q in b_k]
        for q in partners:
            store.union(p.arr, q)
        if not partners:
            store.pin(p.arr)
    if a_k == [] and b_k:
        for q in b_k:
            store.pin(q.arr)
    heads_a = [_merge_k(store, p, ka) for p in a_k if set(p.dims) - {ka}]
    heads_b = [_merge_k(store, p, kb) for p in b_k if set(p.dims) - {kb}]
    rest_a = [p for p in pa if ka not in p.dims] + heads_a
    rest_b = [p for p in pb if kb not in p.dims] + heads_b
    batch = set(range(r - 2))
    _couple_batch(store, rest_a, rest_b, sa, sb, batch)
    _couple_batch(store, rest_b, rest_a, sb, sa, batch)
    out = list(rest_a)
    out += [q for q in rest_b if not (set(q.dims) <= batch and any(p.dims == q.dims for p in rest_a))]
    return tuple(out)


def _fold(store, p: Plane, keep: int, drop: int) -> Plane:
    """Merge a plane along the row/column dim ``drop`` so it depends on batch dims and ``keep`` only."""
    if drop in p.dims:
        rest = tuple(d for d in p.dims if d != drop)
        store.union(p.arr, squeeze_to_dims(p.arr, rest))
        return Plane(rest, squeeze_to_dims(p.arr, rest))
    return p


def _merge_k(store, p: Plane, k: int) -> Plane:
    rest = tuple(d for d in p.dims if d != k)
    store.union(p.arr, squeeze_to_dims(p.arr, rest))
    return Plane(rest, squeeze_to_dims(p.arr, rest))


def _couple_batch(store, mine: List[Plane], theirs: List[Plane], s_mine, s_theirs, batch) -> None:
    for p in mine:
        bd = set(p.dims) & batch
        if not bd:
            continue
        if all(s_theirs[d] == 1 for d in bd):
            continue
        partners = [q for q in theirs if set(q.dims) & bd]
        for q in partners:
            store.union(p.arr.take([0], axis=-1).take([0], axis=-2), q.arr.take([0], axis=-1).take([0], axis=-2))
        if not partners:
            store.pin(p.arr)


def matmul(call: Call):
    """torch.matmul / @ / bmm on operands of rank >= 2 (1-D operands are barriers)."""
    a, b = call.args[0], call.args[1]
    if a.dim() < 2 or b.dim() < 2:
        pin_all(call.store, list(call.largs[0] or ()) + list(call.largs[1] or ()))
        call.store.barrier(call.node.name, "matmul with a 1-D operand")
        return ()
    return matmul_planes(call.store, tuple(a.shape), call.largs[0] or (), tuple(b.shape), call.largs[1] or ())


def sdpa(call: Call):
    """F.scaled_dot_product_attention(q, k, v): q @ kᵀ then @ v, on planes."""
    q, k, v = call.args[0], call.args[1], call.args[2]
    lq, lk, lv = (call.larg(i, n) or () for i, n in enumerate(("query", "key", "value")))
    if q.dim() < 2:
        return matmul(call)
    n = k.dim()
    kt = [Plane(tuple(sorted({n - 1: n - 2, n - 2: n - 1}.get(d, d) for d in p.dims)), p.arr.swapaxes(-1, -2)) for p in lk]
    kt_shape = tuple(k.shape[:-2]) + (k.shape[-1], k.shape[-2])
    att = matmul_planes(call.store, tuple(q.shape), lq, kt_shape, kt)
    att_shape = tuple(q.shape[:-1]) + (k.shape[-2],)
    att = [p for p in att if p.arr.ndim and (len(att_shape) - 1) not in p.dims]  # no labels on key positions
    return matmul_planes(call.store, att_shape, att, tuple(v.shape), lv)
