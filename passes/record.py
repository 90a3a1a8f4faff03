"""Record every node's value of a traced model once, as meta tensors (shapes, dtypes; no data).

The channel analysis replays these values instead of computing. A meta run (no arithmetic) stands in for a real
one where it fails exactly where a real run would; otherwise, or when it fails, the real run decides.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch.fx.immutable_collections import immutable_dict
import torch.fx as fx
from torch import nn

from . import meta_shapes
from .tensors import eval_mode, modules_by_name, params_and_buffers


def _meta_can_stand_in(gm: fx.GraphModule, inputs: Tuple[Any, ...],
                       named: Optional[List[Tuple[str, torch.Tensor]]] = None) -> bool:
    """Whether a meta run fails exactly where a real one would: one device and one floating dtype across
    parameters, buffers and inputs (meta kernels of some ops, e.g. linear, do not compare dtypes; a model may
    also move or cast its inputs itself). Otherwise the real run decides. ``named``: ``named_tensors(gm)``."""
    if named is None:
        params, buffers = params_and_buffers(gm)
        tensors = params + buffers
    else:
        tensors = [t for _, t in named]
    tensors += [t for t in inputs if isinstance(t, torch.Tensor)]
    return len({t.device for t in tensors}) <= 1 and len({t.dtype for t in tensors if t.is_floating_point()}) <= 1


def record_values(gm: fx.GraphModule, inputs: Tuple[Any, ...],
                  named: Optional[List[Tuple[str, torch.Tensor]]] = None) -> Dict[str, Any]:
    """Run ``gm`` once (eval mode, no grad) and return {node name: its value with tensors as meta tensors}.

    Runs on meta tensors (no compute) where that can stand in for a real run; falls back to a real run when the
    meta run fails. Errors of the real run propagate. ``gm`` and ``inputs`` are left untouched. ``named``:
    ``named_tensors(gm)`` when the caller has it (taken now).
    """
    return recorded_run(gm, inputs, named)[0]


def recorded_run(gm: fx.GraphModule, inputs: Tuple[Any, ...],
                 named: Optional[List[Tuple[str, torch.Tensor]]] = None) -> Tuple[Dict[str, Any], bool]:
    """`record_values`, and whether the meta run made them (it never changes ``gm``; a real run runs the
    model's own code, which may)."""
    with torch.no_grad():
        if _meta_can_stand_in(gm, inputs, named):
            try:
                return meta_values(gm, inputs), True
            except Exception:  # no meta kernel, a real-device tensor made inside forward, data-dependent code
                pass
        return real_values(gm, inputs), False


def real_values(gm: fx.GraphModule, inputs: Tuple[Any, ...]) -> Dict[str, Any]:
    """{node name: value as a meta skeleton} from one real eval-mode run of ``gm`` (its mode is restored)."""
    with eval_mode(gm):  # eval: a forward pass in train mode would update the copy's BatchNorm statistics
        return _RealRecorder(gm).record(inputs)


def meta_values(gm: fx.GraphModule, inputs: Tuple[Any, ...]) -> Dict[str, Any]:
    """{node name: value} from one eval-mode run of ``gm``'s graph on meta tensors; raises where it cannot run.

    A plain loop over the nodes rather than an fx.Interpreter (whose per-node bookkeeping costs as much as the
    meta ops). Common layers are shaped by `meta_shapes`; any other module runs as a meta twin, made when
    first called (`_MetaTwins`), so ``gm`` itself is never run or changed.
    """
    twins = _MetaTwins(gm)
    values: Dict[str, Any] = {}
    positional = iter(_to_meta(x) for x in inputs)
    lookup = lambda n: values[n.name]  # noqa: E731 (one closure for the run, not two a node)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            value = _placeholder(node, positional)
        elif node.op == "get_attr":
            value = twins.attribute(node.target)
        else:
            args = fx.node.map_arg(node.args, lookup)
            kwargs = fx.node.map_arg(node.kwargs, lookup) if node.kwargs else {}
            value = _meta_call(node, twins, args, kwargs)
        values[node.name] = _to_meta(value)
    return values


def _meta_call(node: fx.Node, twins: "_MetaTwins", args: tuple, kwargs: dict) -> Any:
    """The meta value of one call_function / call_method / call_module / output node."""
    if node.op == "call_function":
        if node.target is torch.cat:
            shaped = meta_shapes.cat(*args, **kwargs)
        else:
            shaped = meta_shapes.binary(node.target, args, kwargs)
        return node.target(*args, **kwargs) if shaped is None else shaped
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_module":
        shaped = meta_shapes.module_output(twins.original(node.target), args, kwargs)
        return twins.module(node.target)(*args, **kwargs) if shaped is None else shaped
    return args[0]  # output


def _placeholder(node: fx.Node, positional: Iterator[Any]) -> Any:
    """What fx.Interpreter binds to a placeholder: the next input, all the rest for ``*args``, or the default."""
    if node.target.startswith("*"):
        return list(positional)
    try:
        return next(positional)
    except StopIteration:
        if node.args:
            return node.args[0]
        raise TypeError(f"the model expects an input for '{node.target}', and none was passed") from None


class _MetaTwins:
    """Meta twins of ``gm``'s submodules and attributes, made on first use and kept for the run.

    A twin is a shallow copy of the module (its own attribute dicts, shared non-tensor values) in eval mode whose
    parameters, buffers and tensor attributes are meta tensors; tensors shared between modules stay shared.
    """

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self._submodules = modules_by_name(gm)  # a shared module under every name
        self._tensors: Dict[int, torch.Tensor] = {}
        self._modules: Dict[int, nn.Module] = {}

    def original(self, target: str) -> nn.Module:
        return self._submodules[target]

    def module(self, target: str) -> nn.Module:
        return self._twin(self.original(target))

    def attribute(self, target: str) -> Any:
        owner, _, name = target.rpartition(".")
        value = getattr(self.gm.get_submodule(owner) if owner else self.gm, name)
        if isinstance(value, nn.Module):
            return self._twin(value)
        return self._meta(value) if isinstance(value, torch.Tensor) else value

    def _meta(self, t: torch.Tensor) -> torch.Tensor:
        if id(t) not in self._tensors:
            m = t.to("meta")
            self._tensors[id(t)] = nn.Parameter(m, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else m
        return self._tensors[id(t)]

    def _twin(self, module: nn.Module) -> nn.Module:
        if id(module) in self._modules:
            return self._modules[id(module)]
        new = copy.copy(module)
        self._modules[id(module)] = new
        for key, value in vars(module).items():
            if isinstance(value, torch.Tensor):  # plain tensor attributes (fx constants, unregistered tensors)
                new.__dict__[key] = self._meta(value)
        new.__dict__["_parameters"] = {k: None if v is None else self._meta(v) for k, v in module._parameters.items()}
        new.__dict__["_buffers"] = {k: None if v is None else self._meta(v) for k, v in module._buffers.items()}
        new.__dict__["_modules"] = {k: None if v is None else self._twin(v) for k, v in module._modules.items()}
        new.__dict__["training"] = False  # eval, as in the real run (train-mode BatchNorm refuses a batch of one)
        return new


FAILED_NODE = "obafx_node"  # attribute a real run's exception carries: the fx node that raised it


class _RealRecorder(fx.Interpreter):
    """Interpreter that runs ``gm`` for real and keeps every node's value as a meta skeleton."""

    def __init__(self, module: nn.Module):
        super().__init__(module)
        self.extra_traceback = False  # fx would append its graph dump to the error; obafx names the node itself
        self.values: Dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        try:
            value = super().run_node(n)
        except Exception as exc:
            if not hasattr(exc, FAILED_NODE):  # the innermost node that failed
                setattr(exc, FAILED_NODE, n)
            raise
        self.values[n.name] = _to_meta(value)
        return value

    def record(self, inputs: Tuple[Any, ...]) -> Dict[str, Any]:
        self.run(*inputs)
        return self.values


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
        items = {k: _to_meta(v) for k, v in value.items()}
        if isinstance(value, immutable_dict):  # a dict the graph returns: fx forbids mutating it
            return immutable_dict(items)
        out = copy.copy(value)  # keeps OrderedDict and other dict subclasses
        out.update(items)
        return out
    return value
