"""Record every node's value of a traced model once, as meta tensors (shapes, dtypes; no data).

The channel analysis replays these values instead of computing. A meta run (no arithmetic) stands in for a real
one where it fails exactly where a real run would; otherwise, or when it fails, the real run decides.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn


def _meta_can_stand_in(gm: fx.GraphModule, inputs: Tuple[Any, ...]) -> bool:
    """Whether a meta run fails exactly where a real one would: one device and one floating dtype across
    parameters, buffers and inputs (meta kernels of some ops, e.g. linear, do not compare dtypes; a model may
    also move or cast its inputs itself). Otherwise the real run decides."""
    tensors = [t for t in (*gm.parameters(), *gm.buffers(), *inputs) if isinstance(t, torch.Tensor)]
    return len({t.device for t in tensors}) <= 1 and len({t.dtype for t in tensors if t.is_floating_point()}) <= 1


def record_values(gm: fx.GraphModule, inputs: Tuple[Any, ...]) -> Dict[str, Any]:
    """Run ``gm`` once (eval mode, no grad) and return {node name: its value with tensors as meta tensors}.

    Runs on a meta copy (no compute) where that can stand in for a real run; falls back to a real run when the
    meta run fails. Errors of the real run propagate. ``gm`` and ``inputs`` are left untouched.
    """
    was_training = gm.training
    gm.eval()  # eval: a forward pass in train mode would update the copy's BatchNorm statistics
    try:
        with torch.no_grad():
            if _meta_can_stand_in(gm, inputs):
                try:
                    return _Recorder(_meta_twin(gm), gm.graph).record(tuple(_to_meta(x) for x in inputs))
                except Exception:  # no meta kernel, a real-device tensor made inside forward, data-dependent code
                    pass
            return _Recorder(gm).record(inputs)
    finally:
        gm.train(was_training)


class _Recorder(fx.Interpreter):
    """Interpreter that keeps every node's value as a meta skeleton (shapes and Python values, no data)."""

    def __init__(self, module: nn.Module, graph: Optional[fx.Graph] = None):
        super().__init__(module, graph=graph)
        self.values: Dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        self.values[n.name] = _to_meta(value)
        return value

    def call_module(self, target: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        # Meta batch/layer norms and some activations run torch's Python decompositions (1-2 ms each, most of
        # a meta run); their output is shaped like their input whenever the input fits them, so skip those.
        module = self.fetch_attr(target)
        if len(args) == 1 and not kwargs and _keeps_shape_on_meta(module, args[0]):
            return _meta_like(args[0])
        return super().call_module(target, args, kwargs)

    def call_function(self, target: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if target is torch.cat:  # meta cat runs a Python decomposition (about 0.5 ms a call): shape it here
            shaped = _meta_cat(*args, **kwargs)
            if shaped is not None:
                return shaped
        return super().call_function(target, args, kwargs)

    def record(self, inputs: Tuple[Any, ...]) -> Dict[str, Any]:
        self.run(*inputs)
        return self.values


def _meta_like(x: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(x)`` for a meta ``x``; dense layouts skip empty_like's Python stride computation
    (about 0.2 ms a call on meta)."""
    dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta") if dense else torch.empty_like(x)


def _meta_cat(tensors: Any = None, dim: int = 0, *, out: Any = None) -> Optional[torch.Tensor]:
    """The meta result of ``torch.cat`` for the plain case (meta tensors of one dtype and rank, sizes agreeing
    off ``dim``); None otherwise, and torch's own kernel then decides (and raises where it should)."""
    if out is not None or not isinstance(tensors, (tuple, list)) or not tensors:
        return None
    if not all(isinstance(t, torch.Tensor) and t.is_meta for t in tensors):
        return None
    first = tensors[0]
    if first.dim() == 0 or not isinstance(dim, int) or not -first.dim() <= dim < first.dim():
        return None
    d = dim % first.dim()
    same = all(t.dtype == first.dtype and t.dim() == first.dim() and
               all(a == b for i, (a, b) in enumerate(zip(t.shape, first.shape)) if i != d) for t in tensors)
    if not same:
        return None
    shape = list(first.shape)
    shape[d] = sum(t.shape[d] for t in tensors)
    return torch.empty(shape, dtype=first.dtype, device="meta")


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ELEMENTWISE = frozenset((nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh,
                          nn.Dropout, nn.Identity))  # exact classes only: subclasses may override forward


def _keeps_shape_on_meta(module: nn.Module, x: Any) -> bool:
    """Whether ``module`` (an exact torch activation or batch/layer norm, without hooks) maps meta ``x`` to a
    tensor of ``x``'s shape."""
    if not isinstance(x, torch.Tensor) or not x.is_meta or module._forward_hooks or module._forward_pre_hooks:
        return False
    if type(module) in _ELEMENTWISE:
        return True
    if type(module) in _BATCH_NORMS:
        try:
            module._check_input_dim(x)
        except ValueError:  # the real module call reports it
            return False
        return x.shape[1] == module.num_features
    if type(module) is nn.LayerNorm:
        n = len(module.normalized_shape)
        return x.dim() >= n and tuple(x.shape[x.dim() - n:]) == tuple(module.normalized_shape)
    return False


def _meta_twin(gm: fx.GraphModule) -> nn.Module:
    """A module tree shaped like ``gm`` whose parameters, buffers and tensor attributes are meta tensors.

    Modules are copied shallowly (their own attribute dicts, shared non-tensor values) and the root is a plain
    Module: a deep copy of a GraphModule regenerates its code and copies its graph, which cost more than the meta
    run itself. Run it with ``fx.Interpreter(twin, graph=gm.graph)``.
    """
    memo: Dict[int, Any] = {}

    def meta(t: Any) -> Any:
        if id(t) not in memo:
            m = t.to("meta")
            memo[id(t)] = nn.Parameter(m, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else m
        return memo[id(t)]

    def twin(module: nn.Module, root: bool = False) -> nn.Module:
        new = nn.Module() if root else copy.copy(module)
        for key, value in vars(module).items():
            if isinstance(value, torch.Tensor):  # plain tensor attributes (fx constants, unregistered tensors)
                new.__dict__[key] = meta(value)
        new.__dict__["_parameters"] = {k: None if v is None else meta(v) for k, v in module._parameters.items()}
        new.__dict__["_buffers"] = {k: None if v is None else meta(v) for k, v in module._buffers.items()}
        new.__dict__["_modules"] = {k: None if v is None else twin(v) for k, v in module._modules.items()}
        new.__dict__["training"] = module.training
        return new

    return twin(gm, root=True)


def _to_meta(value: Any) -> Any:
    """``value`` with every tensor (also inside tuples, lists and dicts) replaced by its meta twin."""
    if isinstance(value, torch.Tensor):
        return value if value.is_meta else value.to("meta")
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        items = [_to_meta(v) for v in value]
        if type(value) in (tuple, list):
            return type(value)(items)
        try:  # namedtuples take fields, structseqs (torch.return_types) a sequence
            return type(value)(*items) if hasattr(type(value), "_fields") else type(value)(items)
        except TypeError:
            return tuple(items)
    if isinstance(value, dict):
        out = copy.copy(value)
        for k, v in value.items():
            out[k] = _to_meta(v)
        return out
    return value
