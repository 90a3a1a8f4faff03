"""The GraphModule a trace ends in, built as torch.fx builds it, with its submodules installed faster.

fx's ``GraphModule(root, graph)`` installs every ``call_module`` / ``get_attr`` target of the graph from ``root``
into the new module (fx's ``_copy_attr``: each atom of each target through ``nn.Module.__getattr__`` on both
sides, and an AttributeError per missing container): a few milliseconds on a model of hundreds of modules, most of
the cost of making the module. Here the GraphModule is made over an empty graph of the same tracer, the targets
are installed by `_install` (the same walk over the modules' own dicts: same containers, same order, same shared
leaves, same buffers and persistence), and then the graph is set. Where a target's atoms are not plain
submodule names (an attribute of the class, a name already in an instance dict) or module registration hooks
are set, fx's own constructor runs. tests/test_fx_module.py compares the two on a zoo of models.
"""
from __future__ import annotations

import functools
from typing import Dict, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules import module as _nn_module

from .tensors import module_list


def graph_module(root: nn.Module, graph: fx.Graph, name: str) -> fx.GraphModule:
    """``GraphModule(root, graph, name)`` (fx's lazy GraphModule where this torch has it: it generates its code
    when first called or asked for it; the analysis replays the graph itself and rewrite emits a new module)."""
    cls = _module_class()
    targets = [n.target for n in graph.nodes if n.op in ("get_attr", "call_module")]
    if not _plain_targets(root, targets, cls):
        return cls(root, graph, name)
    gm = cls(root, fx.Graph(tracer_cls=graph._tracer_cls, tracer_extras=graph._tracer_extras), name)
    sources: Dict[str, Tuple[nn.Module, nn.Module]] = {}  # containers by path: found once, not once per target
    for target in targets:
        _install(root, gm, target, sources)
    gm.graph = graph
    return gm


def set_training(module: nn.Module, mode: bool) -> None:
    """``module.train(mode)``: every module's flag set to ``mode``; directly where no module in the tree has a
    ``train`` of its own (Module.train's recursion sets the flags through ``__setattr__``, a millisecond on a
    model of hundreds of modules), else through ``train`` (an override, e.g. one that keeps norms frozen)."""
    modules = module_list(module)
    if any(type(m).train is not _MODULE_TRAIN for m in modules):
        module.train(mode)
        return
    for m in modules:
        m.__dict__["training"] = mode  # what Module.__setattr__ stores for a plain attribute


_MODULE_TRAIN = nn.Module.train


def _module_class() -> type:
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule
    except ImportError:  # an older or newer torch without it: generate the code now
        return fx.GraphModule
    return _LazyGraphModule


def _plain_targets(root: nn.Module, targets: list, cls: type) -> bool:
    """Whether `_install` may do fx's work: string targets, no module registration hooks, and no first atom that
    means something on the GraphModule (a class attribute like ``graph`` or ``code``)."""
    if _nn_module._global_module_registration_hooks or not all(isinstance(t, str) for t in targets):
        return False
    taken = _class_names(cls) | _instance_names(cls)
    return not any(t.partition(".")[0] in taken for t in targets)


@functools.lru_cache(maxsize=None)
def _class_names(cls: type) -> frozenset:
    """Every attribute name the class (and its bases) defines."""
    return frozenset(dir(cls))


@functools.lru_cache(maxsize=None)
def _instance_names(cls: type) -> frozenset:
    """The attributes a new GraphModule of ``cls`` sets on itself (``meta``, ``_graph``, hook lists, ...)."""
    return frozenset(vars(cls(nn.Module(), fx.Graph())))


def _install(from_module: nn.Module, to_module: nn.Module, target: str,
             sources: Optional[Dict[str, Tuple[nn.Module, nn.Module]]] = None) -> None:
    """fx's ``_copy_attr(from_module, to_module, target)``: empty ``nn.Module`` containers where ``to_module``
    has none yet, then the target's value (a tensor that is not a Parameter as a buffer, persistent as in
    ``from_module``). Container atoms are read from the modules' ``_modules`` dicts where that is what
    ``getattr`` would return; anything else goes through ``getattr``/``setattr`` as in fx. ``sources``: the
    containers earlier calls walked through, by path: (``from_module``'s, ``to_module``'s); installing never
    changes ``from_module``, and ``to_module``'s is used while it is still the registered child there."""
    *prefix, field = target.split(".")
    path = ""
    for item in prefix:
        path = f"{path}.{item}" if path else item
        hit = sources.get(path) if sources is not None else None
        if hit is not None and item not in to_module.__dict__ and to_module._modules.get(item) is hit[1]:
            from_module, to_module = hit
            continue
        f = _child(from_module, item)
        if f is None:
            f = getattr(from_module, item)  # as fx: raises for a missing atom, None for a None child
        t = _child(to_module, item)
        if f is t:  # a parent already installed: its children came with it
            return
        if t is None:
            t = nn.Module()
            setattr(to_module, item, t)
        if sources is not None and f is not None and from_module._modules.get(item) is f and \
                to_module._modules.get(item) is t and item not in to_module.__dict__:
            sources[path] = (f, t)  # registered children (a property could make a new object each time)
        from_module, to_module = f, t
    orig = getattr(from_module, field)
    if isinstance(orig, torch.Tensor) and not isinstance(orig, nn.Parameter):
        to_module.register_buffer(field, orig, persistent=field not in from_module._non_persistent_buffers_set)
    elif isinstance(orig, nn.Module) and _free_name(to_module, field):
        to_module._modules[field] = orig  # what Module.__setattr__ does for a new submodule name
    else:
        setattr(to_module, field, orig)


def _child(module: nn.Module, item: str):
    """``getattr(module, item, None)``, from ``module._modules`` when the name is only a submodule's."""
    if item in module.__dict__ or item in _class_names(type(module)):
        return getattr(module, item, None)
    found = module._modules.get(item, _MISSING)
    if found is _MISSING:
        return getattr(module, item, None)  # a parameter or buffer of that name, or nothing
    return found


def _free_name(module: nn.Module, name: str) -> bool:
    """No attribute, parameter, buffer or class attribute of ``module`` has ``name``."""
    return not (name in module.__dict__ or name in module._parameters or name in module._buffers
                or name in _class_names(type(module)))


_MISSING = object()

