"""Op rules for ops without parameters: elementwise, reshapes, permutes, indexing, cat/split, reductions.

Each rule takes a `Call` and returns the output's planes (a tuple of Planes for a tensor, a tuple of those for a
tuple output). Rules record unions and pins in ``call.store``.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch

from .call import Call
from .labels import Plane, along, full, index_plane, pin_all, reshape_plane, shifted, squeeze_to_dims


def _shape(v) -> Tuple[int, ...]:
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


def unary(call: Call):
    """Shape-preserving ops (activations, dropout, casts, softmax): planes pass unchanged."""
    return call.lx


def no_planes(call: Call):
    """Ops whose result carries no channels (sizes, dtypes, factories)."""
    return ()


def elementwise_planes(store, out_shape: Sequence[int], operands: Sequence[Tuple[Tuple[int, ...], Sequence[Plane]]]):
    """Broadcasting elementwise op over ``operands`` [(tensor shape, planes)] -> output planes.

    Planes of two operands that cover the same (non-broadcast) dims are unioned position by position. A plane
    facing an operand that has real, unlabelled extent on its dims is pinned: that operand's size is fixed.
    An operand broadcast (size 1) along a plane's dims creates no relation.
    """
    n = len(out_shape)
    ops = []
    for shape, planes in operands:
        shape = (1,) * (n - len(shape)) + tuple(shape)
        bdims = {d for d in range(n) if shape[d] == 1 and out_shape[d] > 1}
        ops.append((shape, bdims, [shifted(p, n) for p in planes]))
    out: List[Plane] = []
    for i, (_, _, planes) in enumerate(ops):
        for p in planes:
            for j, (shape_j, bdims_j, planes_j) in enumerate(ops):
                if j == i or set(p.dims) <= bdims_j:
                    continue
                partners = [q for q in planes_j if set(q.dims) & set(p.dims)]
                if set(p.dims) & bdims_j or not partners:
                    store.pin(p.arr)
                for q in partners:
                    store.union(p.arr, q.arr)
            if not any(q.dims == p.dims for q in out):
                out.append(p)
    return tuple(out)


def elementwise(call: Call):
    """add/sub/mul/div/where/...: every tensor argument takes part."""
    operands = []
    for v, lv in zip(list(call.args) + list(call.kwargs.values()), list(call.largs) + list(call.lkwargs.values())):
        if isinstance(v, torch.Tensor):
            operands.append((tuple(v.shape), tuple(lv or ())))
    return elementwise_planes(call.store, _shape(call.out), operands)


def reshape(call: Call):
    """view/reshape/flatten/unflatten/squeeze/unsqueeze: numpy reshape of each plane."""
    src, dst = _shape(call.x), _shape(call.out)
    return tuple(q for q in (reshape_plane(p, src, dst) for p in call.lx) if q.dims)


def expand(call: Call):
    """expand/expand_as/broadcast_to: only size-1 dims grow, and planes never cover those."""
    n = len(_shape(call.out))
    return tuple(shifted(p, n) for p in call.lx)


def repeat(call: Call):
    """repeat/tile: planes on repeated dims are pinned (the copies would have to shrink together)."""
    src, dst = _shape(call.x), _shape(call.out)
    n = len(dst)
    keep = []
    for p in (shifted(q, n) for q in call.lx):
        src_full = (1,) * (n - len(src)) + src
        if any(dst[d] != src_full[d] for d in p.dims):
            call.store.pin(p.arr)
        else:
            keep.append(p)
    return tuple(keep)


def _perm(call: Call) -> List[int]:
    name = call.node.target if isinstance(call.node.target, str) else getattr(call.node.target, "__name__", "")
    n = call.x.dim()
    rest = list(call.args[1:])
    if name in ("permute",):
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        dims = dims or call.kwargs.get("dims")
        return [d % n for d in dims]
    if name in ("t",) or (name == "T"):
        return list(range(n))[::-1]
    a = rest[0] if rest else call.kwargs.get("dim0", call.kwargs.get("source"))
    b = rest[1] if len(rest) > 1 else call.kwargs.get("dim1", call.kwargs.get("destination"))
    if name in ("movedim", "moveaxis"):
        order = [d for d in range(n) if d != a % n]
        order.insert(b % n, a % n)
        return order
    order = list(range(n))
    order[a % n], order[b % n] = order[b % n], order[a % n]
    return order


def permute(call: Call):
    """permute/transpose/swapaxes/movedim/t: numpy transpose of each plane."""
    order = _perm(call)
    inverse = {src: dst for dst, src in enumerate(order)}
    return tuple(Plane(tuple(sorted(inverse[d] for d in p.dims)), p.arr.transpose(order)) for p in call.lx)


def permute_module(call: Call):
    """torchvision.ops.Permute: a module holding the permutation."""
    order = list(call.module.dims)
    inverse = {src: dst for dst, src in enumerate(order)}
    return tuple(Plane(tuple(sorted(inverse[d] for d in p.dims)), p.arr.transpose(order)) for p in call.lx)


def getitem(call: Call):
    """x[index] on tensors (basic indexing) and on tuples/lists of values."""
    container, index = call.args[0], call.args[1]
    if not isinstance(container, torch.Tensor):
        labels = call.largs[0]
        return labels[index] if labels else ()
    shape = tuple(container.shape)
    idx = index if isinstance(index, tuple) else (index,)
    if any(not isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in idx):
        pin_all(call.store, call.lx)
        call.store.barrier(call.node.name, "advanced (tensor) indexing")
        return ()
    out = []
    for p in call.lx:
        dims_by_int = _int_indexed_dims(idx, len(shape))
        stepped = _stepped_dims(idx, len(shape))
        if set(p.dims) & stepped:
            call.store.pin(p.arr)
            continue
        for d in set(p.dims) & set(dims_by_int):
            call.store.pin(np.take(p.arr, [dims_by_int[d] % shape[d]], axis=d))
        q = index_plane(p, idx, shape)
        if q is not None:
            out.append(q)
    return tuple(out)


def _expand_ellipsis(idx: tuple, ndim: int) -> list:
    idx = list(idx)
    if Ellipsis in idx:
        k = idx.index(Ellipsis)
        fill = ndim - sum(1 for i in idx if i is not None and i is not Ellipsis)
        idx = idx[:k] + [slice(None)] * fill + idx[k + 1 :]
    return idx


def _int_indexed_dims(idx: tuple, ndim: int) -> dict:
    out, src = {}, 0
    for i in _expand_ellipsis(idx, ndim):
        if i is None:
            continue
        if isinstance(i, int):
            out[src] = i
        src += 1
    return out


def _stepped_dims(idx: tuple, ndim: int) -> set:
    out, src = set(), 0
    for i in _expand_ellipsis(idx, ndim):
        if i is None:
            continue
        if isinstance(i, slice) and i.step not in (None, 1):
            out.add(src)
        src += 1
    return out


def cat(call: Call):
    """torch.cat along ``dim``: planes on ``dim`` concatenate (unlabelled parts are pinned positions);
    planes on other dims are coupled across the pieces like an elementwise op."""
    tensors = call.arg(0, "tensors")
    labels = call.larg(0, "tensors") or ((),) * len(tensors)
    n = tensors[0].dim()
    dim = call.arg(1, "dim", 0) % n
    out_shape = _shape(call.out)
    pieces, others = [], []
    for t, planes in zip(tensors, labels):
        on_dim = [p for p in planes if dim in p.dims]
        piece = None
        for p in on_dim:
            if p.dims == (dim,) and piece is None:
                piece = p.arr
            else:
                call.store.pin(p.arr)
        if piece is None:
            shape = [1] * n
            shape[dim] = t.shape[dim]
            piece = np.zeros(shape, dtype=np.int64)
        pieces.append(piece)
        rest = tuple(t.shape[:dim]) + (1,) + tuple(t.shape[dim + 1 :])
        others.append((rest, tuple(p for p in planes if dim not in p.dims)))
    joined = np.concatenate(pieces, axis=dim)
    out = [Plane((dim,), joined)] if np.any(joined) else []
    ref = list(out_shape)
    ref[dim] = 1
    out += list(elementwise_planes(call.store, ref, others))
    return tuple(out)


def stack(call: Call):
    """torch.stack: pieces are coupled elementwise; a new dim is inserted."""
    tensors = call.arg(0, "tensors")
    labels = call.larg(0, "tensors") or ((),) * len(tensors)
    n = tensors[0].dim() + 1
    dim = call.arg(1, "dim", 0) % n
    merged = elementwise_planes(call.store, _shape(tensors[0]), [(_shape(t), lv) for t, lv in zip(tensors, labels)])
    return tuple(Plane(tuple(d + (d >= dim) for d in p.dims), np.expand_dims(p.arr, dim)) for p in merged)


def split(call: Call):
    """split/chunk/tensor_split/unbind: each output piece gets the slice of the planes it holds."""
    name = call.node.target if isinstance(call.node.target, str) else call.node.target.__name__
    n = call.x.dim()
    dim = call.arg(2, "dim", 0) if name in ("split", "chunk", "tensor_split") else call.arg(1, "dim", 0)
    dim = dim % n
    pieces, start = [], 0
    for piece in call.out:
        size = 1 if name == "unbind" else piece.shape[dim]
        planes = []
        for p in call.lx:
            if dim not in p.dims:
                q = p if name != "unbind" else Plane(tuple(d - (d > dim) for d in p.dims), p.arr.squeeze(dim))
                planes.append(q)
                continue
            arr = np.take(p.arr, range(start, start + size), axis=dim)
            if name == "unbind":
                call.store.pin(arr)
                continue
            dims = tuple(d for d in p.dims if arr.shape[d] > 1)
            if dim not in dims:
                call.store.pin(arr)
            if dims:
                planes.append(Plane(dims, squeeze_to_dims(arr, dims)))
        pieces.append(tuple(planes))
        start += size
    return tuple(pieces)


def _reduced_dims(call: Call) -> Tuple[Sequence[int], bool]:
    n = call.x.dim()
    dim = call.arg(1, "dim", None)
    if dim is None and call.node.target in ("max", "min", torch.max, torch.min) and len(call.args) < 2:
        dim = None
    keep = bool(call.arg(2, "keepdim", False))
    if dim is None:
        return list(range(n)), keep
    dims = dim if isinstance(dim, (tuple, list)) else [dim]
    return sorted(d % n for d in dims), keep


def reduce(call: Call):
    """sum/mean/amax/... over dims: planes only on reduced dims vanish; mixed planes merge along them."""
    dims, keep = _reduced_dims(call)
    out = []
    for p in call.lx:
        red = set(p.dims) & set(dims)
        rest = tuple(d for d in p.dims if d not in red)
        if not rest:
            continue
        if red:
            call.store.union(p.arr, squeeze_to_dims(p.arr, rest))
        arr = squeeze_to_dims(p.arr, rest)
        if not keep:
            arr = arr.reshape([s for d, s in enumerate(arr.shape) if d not in dims])
            rest = tuple(d - sum(1 for r in dims if r < d) for d in rest)
        out.append(Plane(rest, arr))
    if isinstance(call.out, tuple):  # max/min with dim return (values, indices)
        return tuple(tuple(out) for _ in call.out)
    return tuple(out)


def spatial(call: Call):
    """Pooling, padding, interpolation: planes pass where sizes are unchanged and are pinned elsewhere."""
    src, dst = _shape(call.x), _shape(call.out)
    if len(src) != len(dst):
        pin_all(call.store, call.lx)
        return ()
    out = []
    for p in call.lx:
        if any(src[d] != dst[d] for d in p.dims):
            call.store.pin(p.arr)
        else:
            out.append(p)
    return tuple(out)


def pixel_shuffle(call: Call):
    """PixelShuffle(r): input channels c*r*r..c*r*r+r*r-1 become output channel c."""
    r = call.module.upscale_factor if call.module is not None else call.arg(1, "upscale_factor")
    out = []
    for p in call.lx:
        if p.dims != (1,):
            call.store.pin(p.arr)
            continue
        lab = p.arr.reshape(-1, r * r)
        call.store.union(lab, lab[:, :1])
        out.append(Plane((1,), lab[:, 0].reshape(1, -1, 1, 1)))
    return tuple(out)


def output(call: Call):
    """The graph's output: nothing leaving the network may change width."""
    _pin_nested(call.store, call.largs[0])
    return ()


def _pin_nested(store, labels) -> None:
    if isinstance(labels, Plane):
        store.pin(labels.arr)
    elif isinstance(labels, (tuple, list)):
        for x in labels:
            _pin_nested(store, x)
    elif isinstance(labels, dict):
        for x in labels.values():
            _pin_nested(store, x)


def barrier(call: Call, why: str = "op not in obafx's table"):
    """An op obafx does not know: every channel going in is pinned, nothing comes out labelled."""
    touched = []
    for lv in list(call.largs) + list(call.lkwargs.values()):
        if lv:
            touched.append(lv)
            _pin_nested(call.store, lv)
    if touched:
        call.store.barrier(call.node.name, why)
    return _empty_like(call.out)


def _empty_like(value):
    if isinstance(value, (tuple, list)):
        return tuple(_empty_like(v) for v in value)
    return ()
