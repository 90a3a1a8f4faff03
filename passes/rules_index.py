"""Op rules for indexing and for the sizes of tensors: x[index] (basic indexing, dynamic bounds), x.size(),
x.shape, tensor attributes, and Python arithmetic on sizes.

A size measured on a prunable dim is a `Width`: pruning changes it. Rules that take sizes as shape arguments
(view, expand, split, slice bounds) stay right because rewrite fixes literal sizes or the bound is checked here;
any op that computes a tensor from a Width pins the measured dim (ops.py).
"""
from __future__ import annotations

import operator
from collections import Counter
from typing import List, Optional, Sequence

import numpy as np
import torch

from .call import Call, collect_widths, op_name
from .labels import Plane, Width, index_plane, merge_along, pin_all


def scalar(call: Call):
    """Arithmetic on Python numbers (math.sqrt, //, *, ...): a result computed from a Width is a Width too;
    ``width * m`` and ``width // k`` (int literals) stay exact, anything else becomes an opaque function of the
    width (which pins it wherever it is used)."""
    found = call.widths()
    if found:
        args = list(call.node.args[:2])
        w = None
        if len(args) == 2 and call.node.target in (operator.mul, operator.floordiv):
            widths = [call.width_of(a) for a in args]
            ints = [a for a in args if isinstance(a, int) and not isinstance(a, bool) and a > 0]
            a = next((x for x in widths if isinstance(x, Width)), None)
            if a is not None and a.div is not None and len(ints) == 1:
                if call.node.target is operator.mul and a.div == 1:  # heads * n_rep
                    w = Width(a.planes, a.dim, 1, a.mul * ints[0])
                elif call.node.target is operator.floordiv and a.mul == 1 and args[1] == ints[0]:  # c // g
                    w = Width(a.planes, a.dim, a.div * ints[0])
        if w is None:
            w = Width(tuple(p for x in found for p in x.planes), found[0].dim, None)
        call.store.widths[call.node.name] = w
    return ()


def size(call: Call):
    """x.size() / x.size(d) / x.numel(): records the Widths of labelled dims (the node carries no planes)."""
    per_dim = tuple(_width(call.lx, d) for d in range(call.x.dim()))
    name = op_name(call.node.target)
    if name in ("numel", "sym_numel"):
        planes = tuple(p for w in per_dim if w is not None for p in w.planes)
        widths = Width(planes, 0, None) if planes else None
    else:
        d = call.arg(1, "dim", None)
        widths = per_dim if d is None else per_dim[d % len(per_dim)]
    if widths is not None:
        call.store.widths[call.node.name] = widths
    return ()


def _width(planes: Sequence[Plane], dim: int) -> Optional[Width]:
    covering = tuple(p for p in planes if dim in p.dims)
    return Width(covering, dim) if covering else None


def getitem(call: Call):
    """x[index] on tensors (basic indexing) and on tuples/lists of values."""
    container, index = call.args[0], call.args[1]
    if not isinstance(container, torch.Tensor):
        widths = call.width_of(call.node.args[0])
        if isinstance(widths, tuple) and isinstance(index, (int, slice)):
            call.store.widths[call.node.name] = widths[index]
        labels = call.largs[0]
        return labels[index] if labels else ()
    return index_tensor(call, index, call.node.args[1])


def index_tensor(call: Call, index, node_index):
    """The planes of ``call.x[index]`` (``node_index``: the same index as written in the graph, with nodes where
    bounds are computed). Shared by getitem and the aten forms (slice, select)."""
    shape = tuple(call.x.shape)
    idx = index if isinstance(index, tuple) else (index,)
    if any(not isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in idx):
        pin_all(call.store, call.lx)
        call.store.barrier(call.node.name, "advanced (tensor) indexing")
        return ()
    _dynamic_bounds(call, idx, shape, node_index)
    out = []
    dims_by_int = _int_indexed_dims(idx, len(shape))
    stepped = _stepped_dims(idx, len(shape))
    for p in call.lx:
        if set(p.dims) & stepped:  # rewrite cannot move strided bounds
            call.store.pin(p.arr)
            continue
        hit = set(p.dims) & set(dims_by_int)
        if hit and set(p.dims) <= hit:  # x[:, 3]: the selected channel must stay; the others may go
            call.store.pin(p.arr[tuple(dims_by_int[d] % shape[d] if d in hit else slice(None) for d in range(len(shape)))])
            continue
        if hit:  # qkv[0] on a (3, heads, head_dim) plane: that dim keeps every coordinate
            p = merge_along(call.store, p, hit)
        q = index_plane(p, idx, shape, call.store)
        if q is not None:
            out.append(q)
    return tuple(out)


def _dynamic_bounds(call: Call, idx: tuple, shape, node_index) -> None:
    """Index entries computed from Widths (``x[..., : x.shape[-1] // 2]``) follow the PRUNED width at run time.
    A bound of exactly width // k on the measured dim stays right when every k-th chunk keeps the same
    indices (rotate_half's halves): those positions are unioned. Any other computed index pins the dim."""
    nidx = _expand_ellipsis(node_index if isinstance(node_index, tuple) else (node_index,), len(shape))
    src = 0
    for entry in nidx:
        if entry is None:
            continue
        found: List[Width] = []
        if isinstance(entry, (slice, torch.fx.Node)):
            collect_widths(call.store, entry, found)
        covering = [p for p in call.lx if src in p.dims]
        for w in found:
            if not (isinstance(entry, slice) and entry.step is None and _balance(call.store, w, covering, src)):
                pin_all(call.store, covering)
                call.store.pin_width(w)
        src += 1


def _balance(store, w: Width, covering: Sequence[Plane], dim: int) -> bool:
    """Union the k chunks of ``covering`` along ``dim`` index by index, when ``w`` is width // k of that very
    dim; False when it is not."""
    same = all(any(q.dims == p.dims and np.array_equal(q.arr, p.arr) for q in w.planes) for p in covering)
    if w.div is None or w.mul != 1 or w.dim != dim or not same:
        return False
    for p in covering:
        size = p.arr.shape[dim]
        if size % w.div:
            return False
        c = size // w.div
        first = np.take(p.arr, range(c), axis=dim)
        for j in range(1, w.div):
            store.union(first, np.take(p.arr, range(j * c, (j + 1) * c), axis=dim))
    return True


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


def attribute(call: Call):
    """getattr(x, name) on a traced value: sizes and dtypes carry no channels, ``.T``/``.mT`` permute, ``.data``
    passes; any other tensor attribute (``.real``, ``.grad``...) is a barrier."""
    name, value = call.arg(1, "name"), call.out
    if name == "shape" and isinstance(call.x, torch.Tensor):
        widths = tuple(_width(call.lx, d) for d in range(call.x.dim()))
        if any(w is not None for w in widths):
            call.store.widths[call.node.name] = widths
        return ()
    if not isinstance(value, torch.Tensor) or not call.lx:
        return ()
    if name in ("data",):
        return call.lx
    if name in ("T", "mT") and call.x.dim() >= 2:
        n = call.x.dim()
        order = list(range(n))[::-1] if name == "T" else list(range(n - 2)) + [n - 1, n - 2]
        inverse = {src: dst for dst, src in enumerate(order)}
        return tuple(Plane(tuple(sorted(inverse[d] for d in p.dims)), p.arr.transpose(order)) for p in call.lx)
    pin_all(call.store, call.lx)
    call.store.barrier(call.node.name, f"tensor attribute .{name} is not in obafx's op table")
    return ()


def check_size_args(call: Call, out_planes: Sequence[Plane]) -> None:
    """view/reshape/expand sizes measured on prunable dims (``x.view(b, g, c // g, ...)``, HF's repeat_kv
    expand) follow the pruned width at run time. ``width // k`` landing on an output dim that holds the first
    of k equal chunks of the measured channels stays right when every chunk keeps the same indices (they are
    unioned); any other measured size pins what it measured."""
    if op_name(call.node.target) not in ("view", "reshape", "_unsafe_view", "expand", "broadcast_to"):
        return
    args = list(call.node.args[1:])
    sizes = list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
    for d, size in enumerate(sizes):
        w = call.width_of(size)
        if isinstance(w, Width) and not _chunks_fit(call.store, w, [p for p in out_planes if d in p.dims], d):
            call.store.pin_width(w)


def _along(p: Plane, dim: int) -> np.ndarray:
    """1-D labels of ``p`` along ``dim`` (index 0 on its other dims: removals are rectangular)."""
    return p.arr[tuple(slice(None) if e == dim else 0 for e in range(p.arr.ndim))]


def _chunks_fit(store, w: Width, here: Sequence[Plane], dim: int) -> bool:
    """Whether ``w`` is the pruned size of output ``dim``: for width * m, that dim holds every measured channel
    m times (HF's repeat_kv: kv_heads * n_rep); for width // k, it holds the first of k equal chunks of the
    measured channels and the chunks keep the same indices (unioned here: channel shuffle's c // g)."""
    if w.div is None or not w.planes or not here:
        return False
    labels, held = _along(w.planes[0], w.dim), Counter(_along(here[0], dim).tolist())
    if w.div == 1:
        return held == Counter({lab: n * w.mul for lab, n in Counter(labels.tolist()).items()})
    if w.mul != 1 or labels.size % w.div or held != Counter(labels[: labels.size // w.div].tolist()):
        return False
    chunks = labels.reshape(w.div, -1)
    store.union(chunks, chunks[:1])
    return True
