"""Rewrite's literal-size fixes: calls whose arguments hold sizes (view/reshape/expand sizes, unflatten sizes,
split sizes, slice bounds, layer_norm's normalized_shape) get the sizes of the pruned graph. One function per
kind of call, registered with the op in ops.py (the op table); each takes (node, old shapes, kept indices, new
shapes), all keyed by node name, and edits the node's arguments in place (rewrite works on its own copy).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx


def sizes(node: fx.Node, shapes, kept, new_shapes) -> None:
    """view/reshape/expand/broadcast_to(x, *sizes): every dim whose size changed gets the new literal (a -1
    stays)."""
    old, new = shapes.get(node.name), new_shapes.get(node.name)
    if old != new:
        _rewrite_sizes(node, old, new, start=1)


def unflatten(node: fx.Node, shapes, kept, new_shapes) -> None:
    """x.unflatten(dim, sizes) / torch.unflatten(x, dim, sizes)."""
    _rewrite_unflatten(node, shapes.get(node.name), new_shapes.get(node.name))


def split(node: fx.Node, shapes, kept, new_shapes) -> None:
    """split/chunk: the pieces' sizes along the split dim become an explicit list when they changed."""
    _rewrite_split(node, shapes.get(node.name), new_shapes.get(node.name))


def getitem(node: fx.Node, shapes, kept, new_shapes) -> None:
    """x[..., a:b, ...]: bounds on a changed dim move to the positions of the kept indices."""
    _rewrite_getitem(node, shapes, kept)


def aten_index(node: fx.Node, shapes, kept, new_shapes) -> None:
    """aten.slice / aten.select (torch.export graphs) on a changed dim: as ``getitem``."""
    _rewrite_aten_index(node, shapes, kept)


def layer_norm(node: fx.Node, shapes, kept, new_shapes) -> None:
    """F.layer_norm / F.rms_norm(x, normalized_shape, ...): normalized_shape follows x's new trailing sizes."""
    _rewrite_layer_norm(node, new_shapes)


def _rewrite_layer_norm(node: fx.Node, new_shapes) -> None:
    """F.layer_norm(x, normalized_shape, ...): normalized_shape follows x's new trailing sizes."""
    x = new_shapes.get(node.args[0].name) if isinstance(node.args[0], fx.Node) else None
    shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
    if x is None or not isinstance(shape, (tuple, list)):
        return
    new = tuple(x[len(x) - len(shape):])
    if len(node.args) > 1:
        node.args = (node.args[0], new) + tuple(node.args[2:])
    else:
        node.kwargs = {**node.kwargs, "normalized_shape": new}


def _rewrite_sizes(node: fx.Node, old, new, start: int) -> None:
    """view/reshape/expand sizes: every dim whose size changed gets the new literal."""
    args = list(node.args)
    packed = len(args) == start + 1 and isinstance(args[start], (tuple, list))
    sizes = list(args[start]) if packed else args[start:]
    if len(sizes) != len(new):
        return
    for d, (o, n) in enumerate(zip(old, new)):
        if o != n and not (sizes[d] == -1):
            sizes[d] = n
    args = args[:start] + ([tuple(sizes)] if packed else sizes)
    node.args = tuple(args)


def _rewrite_unflatten(node: fx.Node, old, new) -> None:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    sizes = node.args[2] if len(node.args) > 2 else node.kwargs.get("sizes")
    if old == new or dim is None or sizes is None:
        return
    d0 = dim % len(new) if dim >= 0 else len(new) - len(sizes) + 1 + dim
    new_sizes = tuple(new[d0 + i] if s != -1 else -1 for i, s in enumerate(sizes))
    args = list(node.args)
    if len(args) > 2:
        args[2] = new_sizes
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, "sizes": new_sizes}


def _rewrite_split(node: fx.Node, old, new) -> None:
    """split/chunk: sizes of the pieces along the split dim become an explicit list when they changed."""
    if old == new or not isinstance(old, tuple) or not old:
        return
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    dim = dim % len(old[0])
    sizes = [piece[dim] for piece in new]
    if [p[dim] for p in old] == sizes:
        return
    if isinstance(node.target, torch._ops.OpOverload):
        node.target = torch.ops.aten.split_with_sizes.default
    else:
        node.target = "split" if node.op == "call_method" else torch.split
    node.args = (node.args[0], sizes, dim)
    node.kwargs = {}


def _rewrite_getitem(node: fx.Node, shapes, kept) -> None:
    """x[..., a:b, ...] on a changed dim: bounds move to the positions of the kept indices."""
    src = node.args[0]
    if not isinstance(src, fx.Node) or not isinstance(shapes.get(src.name), tuple):
        return
    src_shape, src_kept = shapes[src.name], kept.get(src.name)
    if src_kept is None or any(isinstance(s, tuple) for s in src_shape) or all(k is None for k in src_kept):
        return
    index = node.args[1]
    idx = list(index) if isinstance(index, tuple) else [index]
    if any(i is Ellipsis for i in idx):
        k = idx.index(Ellipsis)
        fill = len(src_shape) - sum(1 for i in idx if i is not None and i is not Ellipsis)
        idx = idx[:k] + [slice(None)] * fill + idx[k + 1:]
    out, d = [], 0
    for i in idx:
        if i is None:
            out.append(i)
            continue
        keep = src_kept[d] if d < len(src_kept) else None
        out.append(_move_index(i, keep, src_shape[d]) if keep is not None else i)
        d += 1
    node.args = (src, tuple(out) if isinstance(index, tuple) or len(out) > 1 else out[0])


def _rewrite_aten_index(node: fx.Node, shapes, kept) -> None:
    """aten.slice(x, dim, start, end, step) / aten.select(x, dim, index) on a changed dim: the bounds (the
    index) move to the positions of the kept indices, as for x[...] (`_rewrite_getitem`)."""
    src = node.args[0]
    src_kept = kept.get(src.name) if isinstance(src, fx.Node) else None
    src_shape = shapes.get(src.name) if isinstance(src, fx.Node) else None
    if src_kept is None or not isinstance(src_shape, tuple) or any(isinstance(s, tuple) for s in src_shape):
        return
    args = list(node.args) + [None] * (5 - len(node.args))
    dim = (args[1] if args[1] is not None else node.kwargs.get("dim", 0)) % len(src_shape)
    keep = src_kept[dim] if dim < len(src_kept) else None
    if keep is None or len(keep) == src_shape[dim]:  # the dim kept every position (bounds on a dynamic size stay)
        return
    if node.target is torch.ops.aten.select.int:
        node.args = (src, args[1], _move_index(args[2], keep, src_shape[dim]))
        return
    moved = _move_index(slice(args[2], args[3], args[4]), keep, src_shape[dim])
    node.args = (src, args[1], moved.start, moved.stop) + ((moved.step,) if moved.step is not None else ())


def _move_index(i: Any, keep: np.ndarray, size: int) -> Any:
    if isinstance(i, int):
        return int(np.searchsorted(keep, i % size))
    if isinstance(i, slice) and all(isinstance(b, (int, type(None))) for b in (i.start, i.stop)):
        start = None if i.start is None else int(np.searchsorted(keep, i.start % size if i.start < 0 else min(i.start, size)))
        stop = None if i.stop is None else int(np.searchsorted(keep, i.stop % size if i.stop < 0 else min(i.stop, size)))
        return slice(start, stop, i.step)
    return i
