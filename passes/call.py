"""`Call`: what an op rule sees of one fx node (values, their planes, the module) and small accessors."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .labels import Plane, Store, Width, plane_for


@dataclass(eq=False)
class Call:
    """One node being interpreted: real argument values, their planes and the real output."""

    node: fx.Node
    store: Store
    gm: fx.GraphModule
    args: Tuple[Any, ...]
    kwargs: dict
    largs: Tuple[Any, ...]
    lkwargs: dict
    out: Any
    module: Optional[nn.Module] = None

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """The real value of positional argument ``i`` / keyword ``name``."""
        if i < len(self.args):
            return self.args[i]
        return self.kwargs.get(name, default)

    def larg(self, i: int, name: str) -> Any:
        """The planes of positional argument ``i`` / keyword ``name`` (() for untracked tensors)."""
        if i < len(self.largs):
            return self.largs[i]
        return self.lkwargs.get(name, ())

    def arg_node(self, i: int, name: str) -> Any:
        if i < len(self.node.args):
            return self.node.args[i]
        return self.node.kwargs.get(name)

    @property
    def x(self) -> torch.Tensor:
        return self.args[0]

    @property
    def lx(self) -> Tuple[Plane, ...]:
        return tuple(self.largs[0] or ())

    def widths(self) -> List[Width]:
        """Every Width among the node's arguments (nested in tuples, lists, dicts and slices)."""
        found: List[Width] = []
        if self.store.widths:  # most models measure no sizes: skip walking the arguments
            collect_widths(self.store, (self.node.args, self.node.kwargs), found)
        return found

    def width_of(self, arg: Any) -> Any:
        """The Width (or tuple of them) recorded for an argument node, or None."""
        return self.store.widths.get(arg.name) if isinstance(arg, fx.Node) else None

    def owner(self) -> str:
        return self.node.target if self.node.op == "call_module" else self.node.name

    def param(self, i: int, name: str, attr: str, dim: int, role: str,
              like: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        """Labels of one dim of a layer parameter: the module's ``attr`` for call_module nodes, or the
        get_attr argument ``i``/``name`` for functional calls. None when the parameter is absent or computed
        (then the dim is fixed). ``like``: labels the rule unions the slot with next (see `Store.slot`)."""
        node = self.node
        if node.op == "call_module":
            tensor = _module_attr(self.module, attr)
            if not isinstance(tensor, torch.Tensor):
                return None
            target = node.target  # the owner of a module's slots (`owner`)
            return self.store.slot(f"{target}.{attr}", dim, tensor.shape[dim], role, target, like)
        node = self.arg_node(i, name)
        value = self.arg(i, name)
        if not isinstance(node, fx.Node) or node.op != "get_attr" or not isinstance(value, torch.Tensor):
            return None
        return self.store.slot(node.target, dim, value.shape[dim], role, self.owner(), like)


def _module_attr(module: nn.Module, attr: str) -> Any:
    """``getattr(module, attr, None)``: a parameter or buffer straight from the module's dicts (where
    ``nn.Module.__getattr__`` would find it: no instance or class attribute of that name), else getattr."""
    if attr not in module.__dict__ and not _class_defines(type(module), attr):
        if attr in module._parameters:
            return module._parameters[attr]
        if attr in module._buffers:
            return module._buffers[attr]
    return getattr(module, attr, None)


@functools.lru_cache(maxsize=None)
def _class_defines(cls: type, attr: str) -> bool:
    return hasattr(cls, attr)


def op_name(target: Any) -> str:
    """The bare name of a call target, the same for an op's torch-level and aten forms: 'view' for the method
    name, ``torch.Tensor.view`` or ``torch.ops.aten.view.default``; 'transpose' for ``aten.transpose.int``."""
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    return getattr(target, "__name__", "")


def out_planes(labels: Optional[np.ndarray], ndim: int, dim: int, keep: Sequence[Plane] = ()) -> Tuple[Plane, ...]:
    """Planes ``keep`` plus, when ``labels`` exist and are wider than 1, a plane of ``labels`` along ``dim``."""
    extra = (plane_for(labels, ndim, dim),) if labels is not None and labels.shape[0] > 1 else ()
    return tuple(keep) + extra


def collect_widths(store: Store, arg: Any, found: List[Width]) -> None:
    if isinstance(arg, fx.Node):
        w = store.widths.get(arg.name)
        found.extend(x for x in (w if isinstance(w, tuple) else (w,)) if isinstance(x, Width))
    elif isinstance(arg, (tuple, list)):
        for a in arg:
            collect_widths(store, a, found)
    elif isinstance(arg, dict):
        for a in arg.values():
            collect_widths(store, a, found)
    elif isinstance(arg, slice):
        collect_widths(store, (arg.start, arg.stop, arg.step), found)
