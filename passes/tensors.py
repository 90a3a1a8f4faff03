"""Tensors of a module tree by qualified name: the helpers every stage shares (no stage imports another for them).

A ground-floor module: it imports only torch."""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Tuple

import torch
import torch.fx as fx
from torch import nn


def tensor_aliases(module: nn.Module) -> Dict[str, str]:
    """{name: canonical name} for every parameter/buffer reachable under more than one name (tied weights).
    The canonical name is the one ``named_parameters()`` / ``named_buffers()`` report."""
    first: Dict[int, str] = {}
    aliases: Dict[str, str] = {}
    for name, t in named_tensors(module):
        canonical = first.setdefault(id(t), name)
        if canonical != name:
            aliases[name] = canonical
    return aliases


def named_tensors(module: nn.Module) -> List[Tuple[str, torch.Tensor]]:
    """``[*named_parameters(remove_duplicate=False), *named_buffers(remove_duplicate=False)]`` from one walk of
    the module tree (the two walks cost a millisecond each on a model of hundreds of modules)."""
    params: List[Tuple[str, torch.Tensor]] = []
    buffers: List[Tuple[str, torch.Tensor]] = []
    for prefix, m in module.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        params.extend((dot + k, v) for k, v in m._parameters.items() if v is not None)
        buffers.extend((dot + k, v) for k, v in m._buffers.items() if v is not None)
    return params + buffers


def owner_and_attr(module: nn.Module, qualname: str) -> Tuple[nn.Module, str]:
    """The submodule of ``module`` that holds ``qualname``'s last part, and that part (``"a.b.weight"`` ->
    (module.a.b, "weight")); for parameters, buffers and plain tensor attributes alike."""
    owner, _, attr = qualname.rpartition(".")
    return (module.get_submodule(owner) if owner else module), attr


def fingerprint(gm: fx.GraphModule, inputs: Tuple[Any, ...]) -> Tuple[Any, ...]:
    """What recorded values depend on: the graph's nodes, parameter/buffer shapes and the input shapes."""
    tensors = named_tensors(gm)
    nodes = tuple((n.name, n.op, n.target, n.args, n.kwargs) for n in gm.graph.nodes)
    return (id(gm.graph), nodes,
            tuple((n, tuple(t.shape), t.dtype, t.device) for n, t in tensors),
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
