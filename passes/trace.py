"""Trace: a user's model and example input in, a torch.fx GraphModule on a private copy out.

The user's model is deep-copied first, so nothing the pipeline does (tracing, shape propagation, pruning) can
touch it. Tracing failures become `TraceError`s that name the line and say what to do.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterable, Tuple

import torch
import torch.fx as fx
from torch import nn

from .errors import ConfigError, TraceError


@dataclass(frozen=True, eq=False)
class Traced:
    """A traced private copy of the model and the example inputs it was traced for."""

    gm: fx.GraphModule
    inputs: Tuple[Any, ...]


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
    private = copy.deepcopy(model)
    tracer = _LeafTracer(leaf_modules)
    try:
        graph = tracer.trace(private)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, RuntimeError...): report them all.
        raise TraceError(_trace_failure(exc)) from exc
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.train(model.training)
    _check_runs(gm, inputs)
    return Traced(gm, inputs)


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


def _check_runs(gm: fx.GraphModule, inputs: Tuple[Any, ...]) -> None:
    """Run the traced copy once so that a wrong example input fails here, with a clear message."""
    was_training = gm.training
    gm.eval()  # eval: a forward pass in train mode would update the copy's BatchNorm statistics
    try:
        with torch.no_grad():
            gm(*inputs)
    except Exception as exc:  # any failure here means the input does not fit the model
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs]
        raise ConfigError(
            f"the model does not run on the example input (shapes {shapes}): {type(exc).__name__}: {exc}. "
            "What to do: pass an example input shaped like one real batch for this model, on the model's device."
        ) from exc
    finally:
        gm.train(was_training)
