"""Capture: a user's model and example input in, a `Traced` graph of a private copy out, by one of two paths.

- "fx": torch.fx's symbolic trace (trace.py): a graph of torch-level calls and the model's own submodules.
- "export": ``torch.export.export(..., strict=False)`` at the training IR, which keeps meaningful ops
  (aten.linear, aten.conv2d, aten.layer_norm, aten.scaled_dot_product_attention, aten.embedding...) and captures
  code symbolic tracing cannot (Hugging Face transformers 5: ``**kwargs`` decorators, mask code that branches on
  shapes). Every input dim is exported as ``Dim.AUTO``: dims the model lets vary (batch, sequence) stay symbolic,
  so the pruned module runs at other sizes; dims it fixes (channels, image size) and dims of size 1 in the example
  are specialised. Parameters keep the user's names (``model.layers.0.mlp.up_proj.weight``), so plans, reports and
  saved files speak the user's names.
- "auto" (the default): fx first, export where fx cannot trace. ``leaf_modules`` shape the fx path only (export
  traces through every module; a module it cannot capture fails the capture).

The same passes run on either graph: the op table (ops.py) gives aten overloads the rules of their torch-level twins.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn

from .errors import ConfigError, TraceError
from .facts import Recorded, Traced
from .private_copy import private_copy
from .tensors import fingerprint
from .trace import as_inputs, check_precision, check_runs, trace

CAPTURES = ("auto", "fx", "export")


def capture(model: nn.Module, example_input: Any, leaf_modules: Iterable[Any] = (), how: str = "auto") -> Traced:
    """Capture ``model`` on ``example_input`` by ``how`` ("auto", "fx" or "export"; see the module docstring).

    Returns the `Traced` private copy; its ``gm.meta["obafx_capture"]`` says which path made it. Raises TraceError
    naming every path tried and the line each failed at, ConfigError when the example input does not fit.
    """
    if how not in CAPTURES:
        raise ConfigError(f"capture={how!r}. What to do: use one of {list(CAPTURES)} ('auto': torch.fx's symbolic "
                          "trace, and torch.export where that fails).")
    if how == "export":
        return export_capture(model, example_input)
    try:
        traced = trace(model, example_input, leaf_modules)
    except TraceError as fx_error:
        if how == "fx":
            raise
        try:
            return export_capture(model, example_input)
        except TraceError as export_error:
            raise TraceError(f"no capture path could take the model. {fx_error} Then {export_error}") from export_error
    traced.gm.meta["obafx_capture"] = "fx"
    return traced


def export_capture(model: nn.Module, example_input: Any) -> Traced:
    """Capture a private copy of ``model`` with torch.export (non-strict, training IR, every input dim
    ``Dim.AUTO``) and run the graph once on ``example_input``. The result is a plain fx GraphModule (eval/train
    work on it) whose parameters and buffers sit under the user's names."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"compile_prune needs an nn.Module, got {type(model).__name__}.")
    inputs = as_inputs(example_input)
    check_precision(model, inputs)
    private = private_copy(model)
    _warn_fixed_dims(inputs)
    dims = tuple({d: torch.export.Dim.AUTO for d in range(x.dim())} if isinstance(x, torch.Tensor) else None
                 for x in inputs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # export's notes on specialised dims and deprecated APIs
            exported = torch.export.export(private, inputs, strict=False, dynamic_shapes=dims)
    except Exception as exc:  # export raises many types (UserError, GuardOnDataDependentSymNode, TypeError...)
        raise TraceError(_export_failure(exc)) from exc
    unlifted = exported.module()
    gm = fx.GraphModule(unlifted, unlifted.graph, type(model).__name__)  # export's own class refuses eval()/train()
    gm.meta["obafx_capture"] = "export"
    gm.train(model.training)
    values = check_runs(gm, inputs)
    return Traced(gm, inputs, Recorded(fingerprint(gm, inputs), values))


def _warn_fixed_dims(inputs) -> None:
    """torch.export fixes a dim that is 1 in the example (0/1 specialisation): say so, since the pruned module
    will then only run with size 1 there."""
    fixed = [(i, d) for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)
             for d, n in enumerate(x.shape) if n == 1]
    if fixed:
        warnings.warn(f"obafx: torch.export fixes the example input's dims of size 1 (input, dim: {fixed}); the "
                      "pruned module will run only with size 1 there. Pass an example with batch and sequence "
                      "length of at least 2 to keep them free.", UserWarning, stacklevel=3)


def capture_kind(gm: fx.GraphModule) -> str:
    """Which path captured ``gm`` (or the graph it was rewritten from): "fx" or "export"."""
    return gm.meta.get("obafx_capture", "fx")


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_PASSES_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _export_failure(exc: Exception) -> str:
    """Explain an export failure: the innermost frame of model code (the user's or a library's, not torch's) in
    the traceback, what export said (first line), and what to do."""
    where, tb = "", exc.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if not name.startswith((_TORCH_DIR, _PASSES_DIR)):
            where = f'File "{name}", line {tb.tb_lineno}, in {tb.tb_frame.f_code.co_name}'
        tb = tb.tb_next
    at = f" at {where}" if where else ""
    first = (str(exc).strip().splitlines() or [""])[0]
    return (f"torch.export (non-strict) could not capture the model{at}: {type(exc).__name__}: {first}. What to "
            "do: make the forward depend on input shapes and constructor arguments only (no Python branches on "
            "tensor values, no .item()), or prune the part of the model that captures.")
