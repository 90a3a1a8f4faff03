"""Rewrite: the one stage that writes graphs. Traced model + removed units in, a NEW smaller GraphModule out.

Parameters and buffers are sliced, module attributes (in/out channels, features, groups, norm sizes, embed_dim)
follow the new shapes, and literal sizes baked into the graph (view/reshape/expand/split/chunk/slicing) are
rewritten. Ends like fx's own passes: lint, dead-code elimination, recompile.
"""
from __future__ import annotations

import operator
from typing import Any, Dict, Optional, Sequence, Set

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .facts import Coupling, Traced
from .plan import node_kept, plan_from_removed
from .private_copy import private_copy
from .tensors import owner_and_attr, tensor_aliases

aten = torch.ops.aten
_RESHAPES = {"view", "reshape", torch.reshape, aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_EXPANDS = {"expand", "broadcast_to", aten.expand.default}
_SPLITS = {"split", "chunk", torch.split, torch.chunk, aten.split.Tensor, aten.split_with_sizes.default,
           aten.chunk.default}
_LAYER_NORMS = {F.layer_norm, F.rms_norm, aten.layer_norm.default, aten.rms_norm.default}


def rewrite(traced: Traced, coupling: Coupling, shapes: Dict[str, Any], removed: Set[int]) -> fx.GraphModule:
    """A new GraphModule without the ``removed`` units; ``traced`` is left as it was."""
    gm = private_copy(traced.gm)  # deepcopy semantics; a tensor's bytes are copied only if one side writes
    plan = plan_from_removed(coupling, removed)
    aliases = tensor_aliases(gm)
    for name, dims in plan.kept.items():
        _slice_tensor(gm, name, dims, [a for a, canonical in aliases.items() if canonical == name])
    kept = node_kept(coupling, shapes, removed)
    new_shapes = {n: _new_shape(shapes[n], kept[n]) for n in shapes}
    nodes = list(gm.graph.nodes)
    for node in nodes:
        if node.op == "call_module":
            _update_module(gm.get_submodule(node.target), node, new_shapes)
        elif node.op in ("call_method", "call_function"):
            _rewrite_literals(node, shapes, kept, new_shapes)
    gm.graph.lint()
    gm.graph.eliminate_dead_code()
    return fx.GraphModule(gm, gm.graph, type(gm).__name__)  # an eager GraphModule: users script and export it


def _slice_tensor(gm: fx.GraphModule, qualname: str, dims: Dict[int, Sequence[int]], aliases=()) -> None:
    """Replace parameter/buffer ``qualname`` by its slice keeping ``dims[d]`` along each dim d; its ``aliases``
    (other names of the same tied tensor) get the same new tensor, so the tie survives."""
    old = getattr(*owner_and_attr(gm, qualname))
    new = old.detach()
    for d, idx in sorted(dims.items()):
        new = new.index_select(d, torch.as_tensor(list(idx), dtype=torch.long, device=new.device))
    new = new.clone().contiguous()
    if isinstance(old, nn.Parameter):
        new = nn.Parameter(new, requires_grad=old.requires_grad)
    for name in (qualname, *aliases):
        owner, attr = owner_and_attr(gm, name)
        if attr in owner._buffers:
            owner._buffers[attr] = new
        else:  # a parameter, or a plain tensor attribute (fx constants)
            setattr(owner, attr, new)


def _new_shape(shape: Any, kept: Any) -> Any:
    if shape is None or kept is None:
        return shape
    if any(isinstance(s, tuple) or s is None for s in shape):
        return tuple(_new_shape(s, k) for s, k in zip(shape, kept))
    return tuple(len(k) if k is not None else s for s, k in zip(shape, kept))


def _in_shape(node: fx.Node, new_shapes: Dict[str, Any]) -> Optional[tuple]:
    arg = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    return new_shapes.get(arg.name) if isinstance(arg, fx.Node) else None


def _update_module(m: nn.Module, node: fx.Node, new_shapes: Dict[str, Any]) -> None:
    """Make the module's size attributes agree with its (sliced) parameters and new input/output shapes."""
    x, y = _in_shape(node, new_shapes), new_shapes.get(node.name)
    if isinstance(m, nn.modules.conv._ConvNd):
        depthwise = m.groups == m.in_channels and m.groups > 1
        m.in_channels, m.out_channels = x[1], y[1]
        if depthwise:
            m.groups = x[1]
    elif isinstance(m, nn.Linear):
        m.in_features, m.out_features = m.weight.shape[1], m.weight.shape[0]
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        m.num_features = x[1]
    elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
        m.normalized_shape = tuple(x[len(x) - len(m.normalized_shape):])
    elif isinstance(m, nn.GroupNorm):
        m.num_channels = x[1]
    elif isinstance(m, nn.Embedding):
        m.embedding_dim = m.weight.shape[1]
    elif isinstance(m, nn.PReLU):
        m.num_parameters = m.weight.shape[0]
    elif isinstance(m, nn.MultiheadAttention):
        if m.in_proj_weight is not None:  # packed: whole heads went with their input blocks, head_dim stays
            e = m.in_proj_weight.shape[1]
            m.embed_dim = m.kdim = m.vdim = e
            m.num_heads = e // m.head_dim
        m.out_proj.in_features, m.out_proj.out_features = m.out_proj.weight.shape[1], m.out_proj.weight.shape[0]


def _rewrite_literals(node: fx.Node, shapes, kept, new_shapes) -> None:
    """Fix literal sizes in args of shape-making calls whose output changed."""
    target = node.target
    old, new = shapes.get(node.name), new_shapes.get(node.name)
    if target in _RESHAPES and old != new:
        _rewrite_sizes(node, old, new, start=1)
    elif target in _EXPANDS and old != new:
        _rewrite_sizes(node, old, new, start=1, keep_minus_one=True)
    elif target == "unflatten" or target is torch.unflatten:
        _rewrite_unflatten(node, old, new)
    elif target in _SPLITS:
        _rewrite_split(node, old, new)
    elif target is operator.getitem:
        _rewrite_getitem(node, shapes, kept)
    elif target is aten.slice.Tensor or target is aten.select.int:
        _rewrite_aten_index(node, shapes, kept)
    elif target in _LAYER_NORMS:
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


def _rewrite_sizes(node: fx.Node, old, new, start: int, keep_minus_one: bool = False) -> None:
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
        node.target = aten.split_with_sizes.default
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
    if node.target is aten.select.int:
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
