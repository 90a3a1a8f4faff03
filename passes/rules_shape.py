"""Op rules for ops without parameters: elementwise, reshapes, permutes, indexing, cat/split, reductions.

Each rule takes a `Call` and returns the output's planes (a tuple of Planes for a tensor, a tuple of those for a
tuple output). Rules record unions and pins in ``call.store``.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch

from .call import Call, op_name
from .labels import Plane, couple_facing, merge_along, pin_all, reshape_plane, shifted, squeeze_to_dims
from .rules_index import check_size_args, scalar


def value_shape(v) -> Tuple[int, ...]:
    """The shape of a tensor value, () for anything else."""
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


def unary(call: Call):
    """Shape-preserving ops (activations, dropout, casts, softmax): planes pass unchanged."""
    if not isinstance(call.out, torch.Tensor):
        return scalar(call)
    return call.lx


def no_planes(call: Call):
    """Ops whose result carries no channels (sizes, dtypes, factories)."""
    return ()


def elementwise_planes(store, out_shape: Sequence[int], operands: Sequence[Tuple[Tuple[int, ...], Sequence[Plane]]]):
    """Broadcasting elementwise op over ``operands`` [(tensor shape, planes)] -> output planes.

    A plane meets every other operand on the dims where that operand has real extent (not broadcast): it is
    unioned with the partner planes there, merged along the dims where the partner is unlabelled (fixed
    width), and pinned when all its dims face fixed width. Dims where the other operand is broadcast (size 1)
    create no relation.
    """
    n = len(out_shape)
    ops = []
    for shape, planes in operands:
        shape = (1,) * (n - len(shape)) + tuple(shape)
        ops.append((shape, [shifted(p, n) for p in planes]))
    out: List[Plane] = []
    for i, (_, planes) in enumerate(ops):
        for p in planes:
            for j, (shape_j, planes_j) in enumerate(ops):
                facing = {d for d in p.dims if shape_j[d] > 1}
                if j == i or not facing:
                    continue
                couple_facing(store, p, facing, [q for q in planes_j if set(q.dims) & facing])
            if not any(q.dims == p.dims for q in out):
                out.append(p)
    return tuple(out)


def elementwise(call: Call):
    """add/sub/mul/div/where/...: every tensor argument takes part (on Python numbers: see `scalar`)."""
    if not isinstance(call.out, torch.Tensor):
        return scalar(call)
    operands = []
    for v, lv in zip(list(call.args) + list(call.kwargs.values()), list(call.largs) + list(call.lkwargs.values())):
        if isinstance(v, torch.Tensor):
            operands.append((tuple(v.shape), tuple(lv or ())))
    return elementwise_planes(call.store, value_shape(call.out), operands)


def reshape(call: Call):
    """view/reshape/flatten/unflatten/squeeze/unsqueeze: numpy reshape of each plane."""
    out = _reshaped(call.lx, value_shape(call.x), value_shape(call.out))
    check_size_args(call, out)
    return out


def _reshaped(planes: Sequence[Plane], src, dst) -> Tuple[Plane, ...]:
    return tuple(q for q in (reshape_plane(p, src, dst) for p in planes) if q.dims)


def unflatten_module(call: Call):
    """nn.Unflatten(dim, sizes): rewrite does not update the module's ``unflattened_size``, so the unflattened
    dim keeps its width (pinned); planes on other dims pass like a reshape. (x.unflatten / torch.unflatten are
    plain reshapes: rewrite fixes their sizes.)"""
    dim = call.module.dim % call.x.dim()
    pin_all(call.store, [p for p in call.lx if dim in p.dims])
    return _reshaped([p for p in call.lx if dim not in p.dims], value_shape(call.x), value_shape(call.out))


def expand(call: Call):
    """expand/expand_as/broadcast_to: only size-1 dims grow, and planes never cover those."""
    n = len(value_shape(call.out))
    out = tuple(shifted(p, n) for p in call.lx)
    check_size_args(call, out)
    return out


def repeat(call: Call):
    """repeat/tile: planes on repeated dims are pinned (the copies would have to shrink together)."""
    src, dst = value_shape(call.x), value_shape(call.out)
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
    name = op_name(call.node.target)
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


def repeat_interleave(call: Call):
    """x.repeat_interleave(r, dim) with an int r (grouped-query attention's k/v heads): output position j along
    ``dim`` holds input position j // r, so its labels repeat r times. A tensor of repeats or no dim: pinned."""
    repeats, dim = call.arg(1, "repeats"), call.arg(2, "dim", None)
    if dim is None or not isinstance(repeats, int):
        pin_all(call.store, call.lx)
        return ()
    dim = dim % call.x.dim()
    return tuple(Plane(p.dims, np.repeat(p.arr, repeats, axis=dim)) if dim in p.dims else p for p in call.lx)


def _reduced_dims(call: Call) -> Tuple[Sequence[int], bool]:
    """The reduced dims and keepdim. torch.norm(x, p, dim, keepdim) and std/var(x, dim, unbiased, keepdim)
    place their arguments differently from sum(x, dim, keepdim)."""
    n = call.x.dim()
    name = op_name(call.node.target)
    dim_pos = 2 if name in ("norm", "linalg_vector_norm") else 1
    keep_pos = 3 if name in ("norm", "linalg_vector_norm", "std", "var") else 2
    dim = call.arg(dim_pos, "dim", None)
    keep = bool(call.arg(keep_pos, "keepdim", False))
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


def roll(call: Call):
    """torch.roll(x, shifts, dims): a fixed shift along a prunable dim would move other channels after pruning,
    so rolled dims keep their width (pinned; merged along for planes with other dims); other dims pass."""
    n = call.x.dim()
    dims = call.arg(2, "dims", None)
    if dims is None:  # rolls the flattened tensor
        pin_all(call.store, call.lx)
        return ()
    rolled = {d % n for d in (dims if isinstance(dims, (tuple, list)) else [dims])}
    out = []
    for p in call.lx:
        hit = set(p.dims) & rolled
        if not hit:
            out.append(p)
        elif set(p.dims) <= hit:
            call.store.pin(p.arr)
        else:
            out.append(merge_along(call.store, p, hit))
    return tuple(out)


def spatial(call: Call):
    """Pooling, padding, interpolation: planes pass where sizes are unchanged and are pinned elsewhere."""
    src, dst = value_shape(call.x), value_shape(call.out)
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


def pixel_unshuffle(call: Call):
    """PixelUnshuffle(r): input channel c becomes output channels c*r*r .. c*r*r+r*r-1."""
    r = call.module.downscale_factor if call.module is not None else call.arg(1, "downscale_factor")
    out = []
    for p in call.lx:
        if p.dims != (1,):
            call.store.pin(p.arr)
            continue
        out.append(Plane((1,), np.repeat(p.arr, r * r, axis=1)))
    return tuple(out)


def output(call: Call):
    """The graph's output: nothing leaving the network may change width (nor a size it returns)."""
    _pin_nested(call.store, call.largs[0])
    for w in call.widths():
        call.store.pin_width(w)
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
    touched = False
    for w in call.widths():  # e.g. torch.arange(x.size(1)): the measured width must stay
        touched = True
        call.store.pin_width(w)
    for lv in list(call.largs) + list(call.lkwargs.values()):
        if _has_planes(lv):
            touched = True
            _pin_nested(call.store, lv)
    if touched:  # an unknown op on values without channels (sizes, factories, masks) is no barrier to report
        call.store.barrier(call.node.name, why)
    return _empty_like(call.out)


def _has_planes(labels) -> bool:
    if isinstance(labels, Plane):
        return True
    if isinstance(labels, (tuple, list)):
        return any(_has_planes(x) for x in labels)
    if isinstance(labels, dict):
        return any(_has_planes(x) for x in labels.values())
    return False


def _empty_like(value):
    if isinstance(value, (tuple, list)):
        return tuple(_empty_like(v) for v in value)
    return ()
