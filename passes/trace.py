"""Trace: a user's model and example input in, a torch.fx GraphModule on a private copy out.

The user's model is deep-copied first, so nothing the pipeline does (tracing, shape propagation, pruning) can
touch it. Tracing failures become `TraceError`s that name the line and say what to do.

The check that the example input fits runs the graph once on *meta* tensors (shapes, dtypes, no compute, no
memory) and records every node's value as a meta "skeleton"; the channel analysis replays those instead of running
the model again. Where the meta run cannot go (an op without a meta kernel, a tensor made on a real device inside
forward, data-dependent Python), it runs for real and records the same skeletons from the real values.
"""
from __future__ import annotations

import difflib
from typing import Any, Dict, Iterable, Tuple

import torch
import torch.fx as fx
from torch import nn

from .fx_module import graph_module, set_training
from .errors import ConfigError, TraceError, describe_node
from .facts import Recorded, Traced  # noqa: F401 (Recorded, Traced: re-exported, they used to live here)
from .private_copy import private_copy
from .record import FAILED_NODE, recorded_run
from .tracer import LeafTracer
from .tensors import fingerprint as _fingerprint
from .tensors import named_tensors, owner_and_attr, params_and_buffers, tensor_aliases  # noqa: F401 (re-exported)


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


def check_precision(model: nn.Module, inputs: Tuple[Any, ...] = ()) -> None:
    """Refuse what the analysis cannot run on: tensors on the meta device (no data), and floating or complex
    parameters other than float32/float64 (the analysis and the scores need them; half precision loses them)."""
    params, buffers = params_and_buffers(model)
    if any(t.is_meta for t in params) or any(t.is_meta for t in buffers) or \
            any(x.is_meta for x in inputs if isinstance(x, torch.Tensor)):
        raise ConfigError(
            "the model or the example input is on the meta device (shapes without data). What to do: materialise "
            "it first, e.g. model.to_empty(device='cpu') then load_state_dict(...), and pass a real example input.")
    dtypes = {d for d in {p.dtype for p in params} if d.is_floating_point or d.is_complex}
    odd = dtypes - {torch.float32, torch.float64}
    if odd:
        raise ConfigError(
            f"the model holds {sorted(str(d) for d in odd)} parameters; obafx analyses float32 or float64 models. "
            "What to do: prune a float32 copy (model.float()), then convert the pruned module back with "
            ".half() / .to(torch.bfloat16)."
        )


def trace(model: nn.Module, example_input: Any, leaf_modules: Iterable[Any] = ()) -> Traced:
    """Deep-copy ``model``, trace the copy symbolically and run it once on ``example_input``.

    Returns the traced copy. Raises TraceError when fx cannot trace the model (data-dependent control flow,
    unsupported Python) and ConfigError when the example input does not fit the model.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"compile_prune needs an nn.Module, got {type(model).__name__}.")
    inputs = as_inputs(example_input)
    check_precision(model, inputs)
    leaf_modules = _checked_leaf_modules(model, leaf_modules)
    private = private_copy(model)
    tracer = LeafTracer(leaf_modules)
    try:
        graph = tracer.trace(private)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, RuntimeError...): report them all.
        raise TraceError(_trace_failure(exc)) from exc
    for node in graph.nodes:  # annotations left as strings (``from __future__ import annotations``) break jit.script
        if isinstance(node.type, str):
            node.type = None
    gm = graph_module(tracer.root, graph, type(model).__name__)
    set_training(gm, model.training)
    named = named_tensors(gm)  # one walk for the run's check and, where the meta run left gm as it was, the key
    values, meta = _checked_run(gm, inputs, named)
    return Traced(gm, inputs, Recorded(_fingerprint(gm, inputs, named if meta else None), values))



def _checked_leaf_modules(model: nn.Module, leaf_modules: Iterable[Any]) -> tuple:
    """``leaf_modules`` as a tuple of submodule names and module classes; raises ConfigError for an entry that is
    neither, or for a name that matches no submodule (a typo would otherwise be silently ignored)."""
    leaves = tuple(leaf_modules)
    names = {n for n, _ in model.named_modules() if n} if leaves else set()
    for leaf in leaves:
        if not (isinstance(leaf, str) or (isinstance(leaf, type) and issubclass(leaf, nn.Module))):
            raise ConfigError(f"leaf_modules entry {leaf!r} is a {type(leaf).__name__}. What to do: pass submodule "
                              f"names (as in model.named_modules()) or nn.Module classes")
        if isinstance(leaf, str) and leaf not in names:
            close = difflib.get_close_matches(leaf, names, n=5) or sorted(names)[:8]
            raise ConfigError(f"leaf_modules name '{leaf}' matches no submodule of {type(model).__name__}. "
                              f"What to do: use a name from model.named_modules(), e.g. {close}")
    return leaves


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


def check_runs(gm: fx.GraphModule, inputs: Tuple[Any, ...]) -> Dict[str, Any]:
    """Run the traced copy once so that a wrong example input fails here, with a clear message; returns the
    recorded node values (see `record_values`)."""
    return _checked_run(gm, inputs)[0]


def _checked_run(gm: fx.GraphModule, inputs: Tuple[Any, ...], named: Any = None) -> Tuple[Dict[str, Any], bool]:
    """`check_runs`, and whether the meta run made the values (``named``: ``named_tensors(gm)``, taken now)."""
    try:
        return recorded_run(gm, inputs, named)
    except Exception as exc:  # any failure here means the input does not fit the model
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs]
        node = getattr(exc, FAILED_NODE, None)
        at = f" at {describe_node(node)}" if node is not None else ""
        raise ConfigError(
            f"the model does not run on the example input (shapes {shapes}){at}: {type(exc).__name__}: {exc}. "
            "What to do: pass an example input shaped like one real batch for this model, on the model's device."
        ) from exc
