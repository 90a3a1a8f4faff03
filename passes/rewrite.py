"""Rewrite: the one stage that writes graphs. Traced model + removed units in, a NEW smaller GraphModule out.

Parameters and buffers are sliced, module attributes (in/out channels, features, groups, norm sizes, embed_dim)
follow the new shapes, and literal sizes baked into the graph (view/reshape/expand/split/chunk/slicing) are
rewritten: how, for each module type and call, is registered in the op table (ops.py; the fixes themselves are
in rewrite_modules.py and rewrite_literals.py). Ends like fx's own passes: lint, dead-code elimination, recompile.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Set

import torch
import torch.fx as fx
from torch import nn

from .facts import Coupling, Traced
from .ops import module_op, node_op
from .plan import node_kept, plan_from_removed
from .private_copy import private_copy
from .tensors import owner_and_attr, tensor_aliases


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
            module = gm.get_submodule(node.target)
            entry = module_op(module)  # the op table says how this module type's size attributes follow
            if entry is not None and entry.update is not None:
                entry.update(module, _in_shape(node, new_shapes), new_shapes.get(node.name))
        elif node.op in ("call_method", "call_function"):
            entry = node_op(node.op, node.target)  # and how this call's literal sizes follow
            if entry is not None and entry.literals is not None:
                entry.literals(node, shapes, kept, new_shapes)
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
