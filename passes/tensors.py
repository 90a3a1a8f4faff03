"""Tensors of a module tree by qualified name: the helpers every stage shares (no stage imports another for them).

A ground-floor module: it imports only torch."""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn


def tensor_aliases(module: nn.Module) -> Dict[str, str]:
    """{name: canonical name} for every parameter/buffer reachable under more than one name (tied weights).
    The canonical name is the one ``named_parameters()`` / ``named_buffers()`` report."""
    return aliases_of(named_tensors(module))


def aliases_of(named: List[Tuple[str, torch.Tensor]]) -> Dict[str, str]:
    """`tensor_aliases` of a module whose `named_tensors` list the caller has already."""
    first: Dict[int, str] = {}
    aliases: Dict[str, str] = {}
    for name, t in named:
        canonical = first.setdefault(id(t), name)
        if canonical != name:
            aliases[name] = canonical
    return aliases


def named_tensors(module: nn.Module, by_name: Optional[Dict[str, nn.Module]] = None) -> List[Tuple[str, torch.Tensor]]:
    """``[*named_parameters(remove_duplicate=False), *named_buffers(remove_duplicate=False)]`` from one walk of
    the module tree (the two walks cost a millisecond each on a model of hundreds of modules). ``by_name``:
    ``modules_by_name(module)`` when the caller has it (taken now), so the tree is not walked again."""
    params: List[Tuple[str, torch.Tensor]] = []
    buffers: List[Tuple[str, torch.Tensor]] = []
    modules: List[Tuple[str, nn.Module]] = []
    if by_name is None:
        _named_modules(module, "", modules)
    else:
        modules = list(by_name.items())
    for prefix, m in modules:
        dot = f"{prefix}." if prefix else ""
        for k, v in m._parameters.items():
            if v is not None:
                params.append((dot + k, v))
        for k, v in m._buffers.items():
            if v is not None:
                buffers.append((dot + k, v))
    return params + buffers


def modules_by_name(module: nn.Module) -> Dict[str, nn.Module]:
    """``dict(module.named_modules(remove_duplicate=False))``: every submodule under every name it has."""
    out: List[Tuple[str, nn.Module]] = []
    _named_modules(module, "", out)
    return dict(out)


def _named_modules(module: nn.Module, prefix: str, out: List[Tuple[str, nn.Module]]) -> None:
    """Append ``module.named_modules(prefix=prefix, remove_duplicate=False)`` to ``out``: the same pre-order walk
    as plain calls instead of nested generators (a third of the time on a tree of hundreds of modules); a module
    whose class walks its children its own way gets its own named_modules."""
    if type(module).named_modules is not _NAMED_MODULES:
        out.extend(module.named_modules(prefix=prefix, remove_duplicate=False))
        return
    out.append((prefix, module))
    for name, child in module._modules.items():
        if child is not None:
            _named_modules(child, f"{prefix}.{name}" if prefix else name, out)


_NAMED_MODULES = nn.Module.named_modules
_MODULES = nn.Module.modules


def module_list(module: nn.Module) -> List[nn.Module]:
    """``list(module.modules())``: every module of the tree once (a module met again is skipped with its
    subtree), in pre-order, by plain recursion (torch's nested generators cost three times as much on a tree of
    hundreds of modules); where a class walks its children its own way, torch's walk."""
    out: List[nn.Module] = []
    if not _walk_once(module, set(), out):
        return list(module.modules())
    return out


def _walk_once(module: nn.Module, seen: set, out: List[nn.Module]) -> bool:
    """Append ``module``'s tree to ``out`` as ``modules()`` does; False where a class overrides the walk."""
    kind = type(module)
    if kind.named_modules is not _NAMED_MODULES or kind.modules is not _MODULES:
        return False
    if module in seen:
        return True
    seen.add(module)
    out.append(module)
    for child in module._modules.values():
        if child is not None and not _walk_once(child, seen, out):
            return False
    return True


def params_and_buffers(module: nn.Module) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Every parameter and every buffer of ``module``'s tree, from one walk (a tensor may repeat: for checks
    over all tensors, where ``parameters()`` and ``buffers()`` would walk the tree twice)."""
    modules = module_list(module)
    return ([t for m in modules for t in m._parameters.values() if t is not None],
            [t for m in modules for t in m._buffers.values() if t is not None])


def owner_and_attr(module: nn.Module, qualname: str) -> Tuple[nn.Module, str]:
    """The submodule of ``module`` that holds ``qualname``'s last part, and that part (``"a.b.weight"`` ->
    (module.a.b, "weight")); for parameters, buffers and plain tensor attributes alike."""
    owner, _, attr = qualname.rpartition(".")
    return (module.get_submodule(owner) if owner else module), attr


def fingerprint(gm: fx.GraphModule, inputs: Tuple[Any, ...],
                named: Optional[List[Tuple[str, torch.Tensor]]] = None) -> Tuple[Any, ...]:
    """What recorded values depend on: the graph's nodes, parameter/buffer shapes and the input shapes.
    ``named``: ``named_tensors(gm)`` when the caller has it already (taken now: it must describe ``gm`` as is)."""
    tensors = named_tensors(gm) if named is None else named
    nodes = tuple((n.name, n.op, n.target, n.args, n.kwargs) for n in gm.graph.nodes)
    return (id(gm.graph), nodes,
            tuple((n, t.shape, t.dtype, t.device) for n, t in tensors),
            tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else repr(x) for x in inputs))


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the block, its own training flag put back afterwards (children's flags follow
    ``train(was)``, as everywhere in obafx: the modules it runs are its own traced copies)."""
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)
