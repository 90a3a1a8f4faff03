"""Op rules for layers with parameters (conv, linear, norms, embedding, attention) and for matmul.

A rule couples the input's channel planes with the layer's input-channel slot, gives the output a plane of the
layer's output-channel slot, and records every parameter slice that must go with a channel.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from .call import Call, out_planes
from .labels import Plane, along, couple_facing, merge_along, only_on, pin_all, shifted


def couple_dim(call: Call, planes: Sequence[Plane], dim: int, slots: Sequence[Optional[np.ndarray]]) -> None:
    """Union every plane covering ``dim`` with each slot's labels along ``dim``; a slot facing an unlabelled
    (fixed-width) dim is pinned, and so are planes facing a fixed-width slot."""
    n = call.x.dim()
    hits = along(planes, dim)
    present = [s for s in slots if s is not None]
    # A plane on ``dim`` alone whose labels are the slot's (a slot made like its input: a norm's four) needs no
    # union; comparing the bytes first skips the reshape and the union's conversions (most of a norm's rule).
    same = [p.arr.tobytes() if p.dims == (dim,) and p.arr.dtype == np.int64 else None for p in hits]
    for s in present:
        shape = [1] * n
        shape[dim] = s.shape[0]
        mine = s.tobytes() if s.dtype == np.int64 else None
        for p, b in zip(hits, same):
            if b is None or b != mine:
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
    w_in = call.param(1, "weight", "weight", 1, "in", like=only_on(hits, 1) if groups == 1 else None)
    bias = call.param(2, "bias", "bias", 0, "out", like=w_out)
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
    w_in = call.param(1, "weight", "weight", 1, "in", like=only_on(call.lx, n - 1))
    bias = call.param(2, "bias", "bias", 0, "out", like=w_out)
    if w_out is not None and bias is not None:
        call.store.union(bias, w_out)
    couple_dim(call, call.lx, n - 1, [w_in])
    keep = [p for p in call.lx if n - 1 not in p.dims]
    return out_planes(w_out, n, n - 1, keep)


def batch_norm(call: Call):
    """BatchNorm / InstanceNorm(affine) / F.batch_norm: per-channel statistics and affine on dim 1."""
    like = only_on(call.lx, 1)
    if call.module is not None:
        names = ["weight", "bias", "running_mean", "running_var"]
        slots = [call.param(0, n, n, 0, "through", like) for n in names]
    else:
        slots = [call.param(i, n, n, 0, "through", like)
                 for i, n in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]
    _couple_norm(call, 1, slots)
    return call.lx


def _couple_norm(call: Call, dim: int, slots) -> None:
    """A norm's per-channel parameters go with the channels of ``dim``; a norm without parameters (affine=False,
    no running stats) works on any width and constrains nothing."""
    if any(s is not None for s in slots):
        couple_dim(call, call.lx, dim, slots)


def layer_norm(call: Call):
    """LayerNorm / RMSNorm / F.layer_norm / F.rms_norm over the last dim (normalized over more dims: those dims
    are pinned). RMSNorm has no bias: the bias slot is absent (module) or arg 3 is eps (function)."""
    shape = call.module.normalized_shape if call.module is not None else call.arg(1, "normalized_shape")
    n = call.x.dim()
    if len(tuple(shape)) != 1:
        normed = set(range(n - len(tuple(shape)), n))
        pin_all(call.store, [p for p in call.lx if set(p.dims) & normed])
        return tuple(p for p in call.lx if not set(p.dims) & normed)
    like = only_on(call.lx, n - 1)
    slots = [call.param(2, "weight", "weight", 0, "through", like), call.param(3, "bias", "bias", 0, "through", like)]
    _couple_norm(call, n - 1, slots)
    return call.lx


def group_norm(call: Call):
    """GroupNorm(G, C): every group keeps the same within-group indices so that G stays valid."""
    groups = call.module.num_groups if call.module is not None else call.arg(1, "num_groups")
    for p in along(call.lx, 1):
        grid = p.arr.reshape(p.arr.shape[:1] + (groups, -1) + p.arr.shape[2:])
        call.store.union(grid, np.take(grid, [0], axis=1))
    slots = [call.param(2, "weight", "weight", 0, "through"), call.param(3, "bias", "bias", 0, "through")]
    _couple_norm(call, 1, slots)
    return call.lx


def glu(call: Call):
    """nn.GLU / F.glu(x, dim): a * sigmoid(b) over the two halves of ``dim``: position i of the first half goes
    with position i of the second (so the pruned halves still meet), the output carries the first half."""
    n = call.x.dim()
    dim = (call.module.dim if call.module is not None else call.arg(1, "dim", -1)) % n
    out = []
    for p in call.lx:
        if dim not in p.dims:
            out.append(p)
            continue
        half = p.arr.shape[dim] // 2
        first = np.take(p.arr, range(half), axis=dim)
        call.store.union(first, np.take(p.arr, range(half, 2 * half), axis=dim))
        out.append(Plane(p.dims, first))
    return tuple(out)


def prelu(call: Call):
    """PReLU / F.prelu with one slope per channel (dim 1); a single shared slope needs nothing."""
    weight = call.param(1, "weight", "weight", 0, "through")
    if weight is not None and weight.shape[0] > 1:
        couple_dim(call, call.lx, 1, [weight])
    return call.lx


def embedding(call: Call):
    """Embedding: the output's last dim is the weight's dim 1; indices carry no channels."""
    pin_all(call.store, call.lx)
    return out_planes(call.param(1, "weight", "weight", 1, "out"), call.out.dim(), call.out.dim() - 1)


def multihead_attention(call: Call):
    """nn.MultiheadAttention with packed in_proj (q, k, v of one width, no bias_k/bias_v): whole heads go.

    Its forward requires the q/k/v width to equal the query's width (embed_dim), so a head can only go together
    with as many input channels: input block h (columns h*head_dim ...) is tied to head h (its q, k and v rows and
    its out_proj columns). head_dim, and with it the softmax scale, never changes. out_proj's rows (the output
    features) are free. Positions (sequence, batch) are mixed by attention: planes on them are pinned. Other
    forms (separate q/k/v weights, bias_k) keep embed_dim: their inputs are pinned, out_proj's rows may shrink.
    """
    m, store = call.module, call.store
    inputs = [call.larg(i, name) or () for i, name in enumerate(("query", "key", "value"))]
    attn = call.out[0]
    if not m._qkv_same_embed_dim or m.in_proj_weight is None or m.bias_k is not None:
        for planes in inputs:
            pin_all(store, planes)
        return (_out_proj_plane(call, attn), ()) if m.in_proj_weight is not None else ((), ())
    heads, head_dim = m.num_heads, m.head_dim
    cols = store_out(call, "in_proj_weight", 1, "in")
    rows = store_out(call, "in_proj_weight", 0, "out")
    bias = store_out(call, "in_proj_bias", 0, "out")
    last = call.x.dim() - 1
    for p in (p for planes in inputs for p in planes):
        if p.dims == (last,):
            store.union(p.arr.reshape(-1), cols)
        else:
            store.pin(p.arr)
    if bias is not None:
        store.union(bias, rows)
    grid = rows.reshape(3, heads, head_dim)
    head = grid[:1, :, :1]  # one label per head: its q, k and v rows go together
    store.union(grid, head)
    store.union(cols.reshape(heads, head_dim), head.reshape(heads, 1))
    out_cols = store_out(call, "out_proj.weight", 1, "in")
    store.union(out_cols.reshape(heads, head_dim), head.reshape(heads, 1))
    return (_out_proj_plane(call, attn), ())


def _out_proj_plane(call: Call, attn) -> tuple:
    """The attention output's plane: out_proj's rows (and bias) along the last dim."""
    rows = store_out(call, "out_proj.weight", 0, "out")
    bias = store_out(call, "out_proj.bias", 0, "out")
    if bias is not None:
        call.store.union(bias, rows)
    return out_planes(rows, attn.dim(), attn.dim() - 1)


def store_out(call: Call, qualname: str, dim: int, role: str) -> Optional[np.ndarray]:
    """Labels of a nested parameter of the called module (e.g. MultiheadAttention's out_proj.weight)."""
    tensor = dict(call.module.named_parameters()).get(qualname)
    if tensor is None:
        return None
    return call.store.slot(f"{call.node.target}.{qualname}", dim, tensor.shape[dim], role, call.owner())


def _only_on(store, p: Plane, dim: int) -> np.ndarray:
    """1-D labels of ``p`` along ``dim`` after merging it along its other dims (heads keep their count: the
    same indices go in every head)."""
    return merge_along(store, p, set(p.dims) - {dim}).arr.reshape(-1)


def _contract(store, a_k: List[np.ndarray], b_k: List[np.ndarray]) -> None:
    """The contracted dim: A's and B's labels go index by index; a side facing an unlabelled side is pinned."""
    for p in a_k:
        for q in b_k:
            store.union(p, q)
    if not (a_k and b_k):
        for lab in a_k + b_k:
            store.pin(lab)


def _couple_batch(store, mine: List[Plane], s_theirs, theirs: List[Plane], batch) -> None:
    """Batch dims of a matmul couple like an elementwise op (broadcasting included)."""
    for p in mine:
        facing = {d for d in p.dims if d in batch and s_theirs[d] > 1}
        if facing:
            couple_facing(store, p, facing, [q for q in theirs if set(q.dims) & facing])


def matmul_planes(store, sa, pa, sb, pb) -> Tuple[Plane, ...]:
    """A @ B with A [..., n, k] and B [..., k, m] (both at least 2-D). The contracted dim couples A's and B's
    labels index by index; a plane spanning k and other dims (attention heads) is merged along the others
    first, so heads keep their count and lose the same head-dim indices. Row/column planes pass to the output;
    batch dims couple like an elementwise op."""
    r = max(len(sa), len(sb))
    sa, sb = (1,) * (r - len(sa)) + tuple(sa), (1,) * (r - len(sb)) + tuple(sb)
    pa, pb = [shifted(p, r) for p in pa], [shifted(p, r) for p in pb]
    ka, kb = r - 1, r - 2
    _contract(store, [_only_on(store, p, ka) for p in pa if ka in p.dims],
              [_only_on(store, p, kb) for p in pb if kb in p.dims])
    rest_a = [p for p in pa if ka not in p.dims]
    rest_b = [p for p in pb if kb not in p.dims]
    batch = set(range(r - 2))
    _couple_batch(store, rest_a, sb, rest_b, batch)
    _couple_batch(store, rest_b, sa, rest_a, batch)
    out = list(rest_a)
    out += [q for q in rest_b if not (set(q.dims) <= batch and any(p.dims == q.dims for p in rest_a))]
    return tuple(out)


def matmul(call: Call):
    """torch.matmul / @ / bmm on operands of rank >= 2 (1-D operands are barriers). A 2-D get_attr weight is a
    layer: x @ W produces W's columns, W @ x produces W's rows."""
    a, b = call.args[0], call.args[1]
    if a.dim() < 2 or b.dim() < 2:
        pin_all(call.store, list(call.largs[0] or ()) + list(call.largs[1] or ()))
        call.store.barrier(call.node.name, "matmul with a 1-D operand")
        return ()
    for i, (in_dim, out_dim) in ((1, (0, 1)), (0, (1, 0))):
        if (call.args[i].dim() == 2 and call.param(i, "", "", out_dim, "out") is not None):
            call.param(i, "", "", in_dim, "in")
    return matmul_planes(call.store, tuple(a.shape), call.largs[0] or (), tuple(b.shape), call.largs[1] or ())


def sdpa(call: Call):
    """F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa): q and k
    share head-dim indices (the same in every head), v's head dim becomes the output's. With the default
    scale 1/sqrt(q.size(-1)) the q/k head dim stays (pruning it would change the scale)."""
    store = call.store
    names = ("query", "key", "value")
    values = [call.arg(i, n) for i, n in enumerate(names)]
    planes = [call.larg(i, n) or () for i, n in enumerate(names)]
    pin_all(store, call.larg(3, "attn_mask") or ())
    last = [v.dim() - 1 for v in values]
    for p_list, d in zip(planes, last):
        pin_all(store, [p for p in p_list if d not in p.dims])
    qk = [[_only_on(store, p, d) for p in p_list if d in p.dims] for p_list, d in zip(planes[:2], last[:2])]
    _contract(store, qk[0], qk[1])
    if call.arg(6, "scale", None) is None:
        for lab in qk[0] + qk[1]:
            store.pin(lab)
    v_lab = [_only_on(store, p, last[2]) for p in planes[2] if last[2] in p.dims]
    for lab in v_lab[1:]:
        store.union(lab, v_lab[0])
    return out_planes(v_lab[0] if v_lab else None, call.out.dim(), call.out.dim() - 1)
