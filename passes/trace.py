"""Trace: a user's model and example input in, a torch.fx GraphModule on a private copy out.

The user's model is deep-copied first, so nothing the pipeline does (tracing, shape propagation, pruning) can
touch it. Tracing failures become `TraceError`s that name the line and say what to do.

The check that the example input fits runs the graph once on *meta* tensors (shapes, dtypes, no compute, no
memory) and records every node's value as a meta "skeleton"; the channel analysis replays those instead of running
the model again. Where the meta run cannot go (an op without a meta kernel, a tensor made on a real device inside
forward, data-dependent Python), it runs for real and records the same skeletons from the real values.
"""
from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

from .errors import ConfigError, TraceError


@dataclass(frozen=True, eq=False)
class Recorded:
    """Every node's value (tensors as meta tensors) from one run of a module, and that module's fingerprint."""

    key: Tuple[Any, ...]
    values: Dict[str, Any]


@dataclass(frozen=True, eq=False)
class Traced:
    """A traced private copy of the model and the example inputs it was traced for.

    ``recorded`` (optional) holds the node values of the check run; `recorded_values` hands them out only while
    the module still has the graph and parameter shapes they were recorded for.
    """

    gm: fx.GraphModule
    inputs: Tuple[Any, ...]
    recorded: Optional[Recorded] = field(default=None, repr=False)

    def recorded_values(self) -> Optional[Dict[str, Any]]:
        """The recorded node values if they still describe ``gm`` (else None: run it again)."""
        rec = self.recorded
        return rec.values if rec is not None and rec.key == _fingerprint(self.gm, self.inputs) else None


class _LeafTracer(fx.Tracer):
    """fx's tracer that also treats the user's chosen modules (by qualified name or type) as leaves."""

    def __init__(self, leaf_modules: Iterable[Any] = ()):
        super().__init__()
        leaves = tuple(leaf_modules)
        self._leaf_names = {x for x in leaves if isinstance(x, str)}
        self._leaf_types = tuple(x for x in leaves if isinstance(x, type))

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self._leaf_names or (self._leaf_types and isinstance(m, self._leaf_types)):
            return True
        return super().is_leaf_module(m, qualname)


def as_inputs(example_input: Any) -> Tuple[Any, ...]:
    """Normalise an example input (a tensor, or a tuple/list of positional inputs) to a tuple."""
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)) and len(example_input) > 0:
        return tuple(example_input)
    raise ConfigError(
        f"example_input must be a tensor or a non-empty tuple of positional inputs, got {type(example_input).__name__}. "
        "What to do: pass a tensor shaped like one real batch, e.g. torch.randn(1, 3, 224, 224)."
    )


def check_precision(model: nn.Module) -> None:
    """Refuse half-precision models: the analysis and the scores need float32 or float64."""
    dtypes = {p.dtype for p in model.parameters()}
    low = dtypes & {torch.float16, torch.bfloat16}
    if low:
        raise ConfigError(
            f"the model holds {sorted(str(d) for d in low)} parameters. What to do: prune a float32 copy "
            "(model.float()), then convert the pruned module back with .half() / .to(torch.bfloat16)."
        )


def trace(model: nn.Module, example_input: Any, leaf_modules: Iterable[Any] = ()) -> Traced:
    """Deep-copy ``model``, trace the copy symbolically and run it once on ``example_input``.

    Returns the traced copy. Raises TraceError when fx cannot trace the model (data-dependent control flow,
    unsupported Python) and ConfigError when the example input does not fit the model.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"compile_prune needs an nn.Module, got {type(model).__name__}.")
    check_precision(model)
    inputs = as_inputs(example_input)
    leaf_modules = _checked_leaf_modules(model, leaf_modules)
    private = private_copy(model)
    tracer = _LeafTracer(leaf_modules)
    try:
        graph = tracer.trace(private)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, RuntimeError...): report them all.
        raise TraceError(_trace_failure(exc)) from exc
    for node in graph.nodes:  # annotations left as strings (``from __future__ import annotations``) break jit.script
        if isinstance(node.type, str):
            node.type = None
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.train(model.training)
    values = _check_runs(gm, inputs)
    return Traced(gm, inputs, Recorded(_fingerprint(gm, inputs), values))


def tensor_aliases(module: nn.Module) -> Dict[str, str]:
    """{name: canonical name} for every parameter/buffer reachable under more than one name (tied weights).
    The canonical name is the one ``named_parameters()`` / ``named_buffers()`` report."""
    first: Dict[int, str] = {}
    aliases: Dict[str, str] = {}
    for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        canonical = first.setdefault(id(t), name)
        if canonical != name:
            aliases[name] = canonical
    return aliases


def _checked_leaf_modules(model: nn.Module, leaf_modules: Iterable[Any]) -> tuple:
    """``leaf_modules`` as a tuple of submodule names and module classes; raises ConfigError for an entry that is
    neither, or for a name that matches no submodule (a typo would otherwise be silently ignored)."""
    leaves = tuple(leaf_modules)
    names = {n for n, _ in model.named_modules() if n}
    for leaf in leaves:
        if not (isinstance(leaf, str) or (isinstance(leaf, type) and issubclass(leaf, nn.Module))):
            raise ConfigError(f"leaf_modules entry {leaf!r} is a {type(leaf).__name__}. What to do: pass submodule "
                              f"names (as in model.named_modules()) or nn.Module classes")
        if isinstance(leaf, str) and leaf not in names:
            close = difflib.get_close_matches(leaf, names, n=5) or sorted(names)[:8]
            raise ConfigError(f"leaf_modules name '{leaf}' matches no submodule of {type(model).__name__}. "
                              f"What to do: use a name from model.named_modules(), e.g. {close}")
    return leaves


# Copy CPU parameters and buffers lazily (torch._lazy_clone: storage shared until either side writes, then the
# writer gets its own copy). Values behave exactly as after a deep copy, at no cost for the bytes. One visible
# difference: the side that writes first moves to a new allocation, so a numpy array made from the user's tensor
# before pruning stops aliasing it after the user's next in-place write. Shared-memory and non-CPU tensors are
# copied eagerly. Set to False to restore plain deep copies.
COPY_ON_WRITE = True


def private_copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``; plain CPU parameters and buffers are copied on write (see COPY_ON_WRITE)."""
    memo: Dict[int, Any] = {}
    if COPY_ON_WRITE and hasattr(torch, "_lazy_clone"):
        for t in list(model.parameters()) + list(model.buffers()):
            if _lazy_ok(t) and id(t) not in memo:
                lazy = torch._lazy_clone(t.detach())
                memo[id(t)] = nn.Parameter(lazy, requires_grad=t.requires_grad) if type(t) is nn.Parameter else lazy
    return copy.deepcopy(model, memo)


def _lazy_ok(t: torch.Tensor) -> bool:
    """Plain strided CPU tensors only (no subclasses, shared memory, quantised data or Python attributes)."""
    plain = type(t) is nn.Parameter or (type(t) is torch.Tensor and not t.__dict__ and not t.requires_grad)
    return plain and t.device.type == "cpu" and t.layout == torch.strided and not t.is_quantized and not t.is_shared()


def _trace_failure(exc: Exception) -> str:
    """Explain a tracing failure with the user's line (fx puts it in the traceback) and the usual fixes."""
    tb = exc.__traceback__
    where = ""
    while tb is not None:
        frame = tb.tb_frame
        if "torch/fx" not in frame.f_code.co_filename and "torch/" not in frame.f_code.co_filename:
            where = f'File "{frame.f_code.co_filename}", line {tb.tb_lineno}, in {frame.f_code.co_name}'
        tb = tb.tb_next
    at = f" at {where}" if where else ""
    return (
        f"torch.fx could not trace the model{at}: {type(exc).__name__}: {exc}. What to do: data-dependent "
        "control flow (if/for on tensor values) cannot be traced; move it into a submodule and pass that "
        "submodule's name or type in leaf_modules=[...] (its channels are then kept as they are), or make the "
        "branch depend on constructor arguments instead of tensor values."
    )


def _check_runs(gm: fx.GraphModule, inputs: Tuple[Any, ...]) -> Dict[str, Any]:
    """Run the traced copy once so that a wrong example input fails here, with a clear message; returns the
    recorded node values (see `record_values`)."""
    try:
        return record_values(gm, inputs)
    except Exception as exc:  # any failure here means the input does not fit the model
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs]
        raise ConfigError(
            f"the model does not run on the example input (shapes {shapes}): {type(exc).__name__}: {exc}. "
            "What to do: pass an example input shaped like one real batch for this model, on the model's device."
        ) from exc


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
            return torch.empty_like(args[0])
        return super().call_module(target, args, kwargs)

    def record(self, inputs: Tuple[Any, ...]) -> Dict[str, Any]:
        self.run(*inputs)
        return self.values


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


def _get_attr(gm: fx.GraphModule, target: str) -> Any:
    owner, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr, None)


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


def _fingerprint(gm: fx.GraphModule, inputs: Tuple[Any, ...]) -> Tuple[Any, ...]:
    """What recorded values depend on: the graph, its code, parameter/buffer shapes and the input shapes."""
    tensors = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    return (id(gm.graph), len(gm.graph.nodes), gm.code,
            tuple((n, tuple(t.shape), t.dtype, t.device) for n, t in tensors),
            tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else repr(x) for x in inputs))
