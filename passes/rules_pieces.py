"""Op rules for ops that join tensors or cut them into pieces along a dim: cat, stack, split/chunk/unbind.

Same contract as rules_shape.py: a rule takes a `Call`, records unions and pins in ``call.store`` and returns the
output's planes (a tuple of plane tuples for split's tuple of pieces).
"""
from __future__ import annotations

import numpy as np

from .call import Call, op_name
from .labels import Plane, merge_along, pin_all
from .rules_shape import elementwise_planes, value_shape


def cat(call: Call):
    """torch.cat along ``dim``: the planes on ``dim`` concatenate (unlabelled pieces are pinned positions;
    a piece's plane may also span other dims, e.g. rotate_half on a (heads, head_dim) plane); planes on other
    dims are coupled across the pieces like an elementwise op."""
    tensors = call.arg(0, "tensors")
    labels = call.larg(0, "tensors") or ((),) * len(tensors)
    n = tensors[0].dim()
    dim = call.arg(1, "dim", 0) % n
    simple = _cat_of_channel_planes(tensors, labels, dim, n)
    if simple is not None:
        return simple
    out_shape = value_shape(call.out)
    pieces, others, cover = [], [], {dim}
    for t, planes in zip(tensors, labels):
        piece = None
        for p in (p for p in planes if dim in p.dims):
            if piece is None:
                piece = p
            else:  # two labellings of the same positions go together
                call.store.union(piece.arr, p.arr)
        if piece is None:
            shape = [1] * n
            shape[dim] = t.shape[dim]
            piece = Plane((dim,), np.zeros(shape, dtype=np.int64))
        pieces.append(piece)
        cover |= set(piece.dims)
        rest = tuple(t.shape[:dim]) + (1,) + tuple(t.shape[dim + 1 :])
        others.append((rest, tuple(p for p in planes if dim not in p.dims)))
    grids = []
    for t, piece in zip(tensors, pieces):
        grid = [out_shape[d] if d in cover else 1 for d in range(n)]
        grid[dim] = t.shape[dim]
        grids.append(np.broadcast_to(piece.arr, grid))
    joined = np.ascontiguousarray(np.concatenate(grids, axis=dim))
    out = [Plane(tuple(sorted(cover)), joined)] if np.any(joined) else []
    ref = list(out_shape)
    ref[dim] = 1
    out += list(elementwise_planes(call.store, ref, others))
    return tuple(out)


def _cat_of_channel_planes(tensors, labels, dim: int, n: int):
    """`cat`'s output planes when every piece has at most one plane and it covers ``dim`` alone (DenseNet's
    feature concatenation): the 1-D labels concatenate, and there are no other planes to couple. None for any
    other case. The same result as the general path, without broadcasting grids (a DenseNet has 58 such cats
    of up to 32 pieces)."""
    parts = []
    for t, planes in zip(tensors, labels):
        if not planes:
            parts.append(np.zeros(t.shape[dim], dtype=np.int64))  # a fixed-width piece: pinned positions
        elif len(planes) == 1 and planes[0].dims == (dim,):
            parts.append(planes[0].arr.reshape(-1))
        else:
            return None
    joined = np.concatenate(parts)
    if not joined.any():
        return ()
    shape = [1] * n
    shape[dim] = joined.shape[0]
    return (Plane((dim,), joined.reshape(shape)),)


def stack(call: Call):
    """torch.stack: pieces are coupled elementwise; a new dim is inserted."""
    tensors = call.arg(0, "tensors")
    labels = call.larg(0, "tensors") or ((),) * len(tensors)
    n = tensors[0].dim() + 1
    dim = call.arg(1, "dim", 0) % n
    operands = [(value_shape(t), lv) for t, lv in zip(tensors, labels)]
    merged = elementwise_planes(call.store, value_shape(tensors[0]), operands)
    return tuple(Plane(tuple(d + (d >= dim) for d in p.dims), np.expand_dims(p.arr, dim)) for p in merged)


def split(call: Call):
    """split/chunk/tensor_split/unbind: each output piece gets the slice of the planes it holds. A piece of
    width 1 along a plane's only dim pins that channel (the piece would vanish); on a multi-dim plane the split
    dim keeps every coordinate (the plane is merged along it)."""
    name = op_name(call.node.target)
    n = call.x.dim()
    pieces_then_dim = ("split", "split_with_sizes", "chunk", "tensor_split")
    dim = call.arg(2, "dim", 0) if name in pieces_then_dim else call.arg(1, "dim", 0)
    dim = dim % n
    lx = list(call.lx)
    sizes = [1 if name == "unbind" else piece.shape[dim] for piece in call.out]
    if min(sizes) == 1 or name == "tensor_split":  # rewrite fixes split/chunk sizes, not tensor_split's
        lx = [merge_along(call.store, p, {dim}) if dim in p.dims and len(p.dims) > 1 else p for p in lx]
        if name == "tensor_split":
            pin_all(call.store, [p for p in lx if dim in p.dims])
    pieces, start = [], 0
    for size in sizes:
        planes = []
        for p in lx:
            if dim not in p.dims:
                planes.append(p if name != "unbind" else Plane(tuple(d - (d > dim) for d in p.dims), p.arr.squeeze(dim)))
                continue
            arr = np.take(p.arr, range(start, start + size), axis=dim)
            if size == 1:
                call.store.pin(arr)
                continue
            planes.append(Plane(p.dims, arr))
        pieces.append(tuple(planes))
        start += size
    return tuple(pieces)
