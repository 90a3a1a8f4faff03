"""obafx's user-facing errors.

Every error that reaches a user names what went wrong, where (the fx node, its op and the user's source line
when there is one) and what to do next.
"""
from __future__ import annotations

import linecache

import torch.fx as fx


class ObafxError(Exception):
    """Base class of every error obafx raises on purpose."""


class TraceError(ObafxError):
    """The model could not be traced by torch.fx."""


class ConfigError(ObafxError, ValueError):
    """An argument is outside what the call accepts (budget, names, data)."""


class BudgetError(ObafxError):
    """The requested budget cannot be met under the constraints."""


class PlanError(ObafxError):
    """A saved plan or weights file does not match the model it is applied to."""


class PathError(ObafxError, OSError):
    """A file obafx was asked to read or write cannot be opened there (missing file, missing folder, no access)."""


class ScoreError(ObafxError):
    """Importance scores could not be computed (loss not scalar, NaN/inf, wrong data)."""


class UnsupportedOpError(ObafxError):
    """An op whose channel behaviour obafx does not know was asked to be pruned through."""


SOURCE_KEY = "obafx_source"  # node.meta key: (file, line, function) of the model code that made the node (trace.py)


def user_line(node: fx.Node) -> str:
    """The line of the user's source that produced ``node`` ('File "x.py", line N, in f: code'), from what obafx's
    tracer recorded (``node.meta[SOURCE_KEY]``) or else fx's ``node.stack_trace``; '' when neither has it."""
    source = node.meta.get(SOURCE_KEY)
    if source is not None:
        filename, lineno, function = source
        code = linecache.getline(filename, lineno).strip()
        where = f'File "{filename}", line {lineno}, in {function}'
        return f"{where}: {code}" if code else where
    trace = node.meta.get("stack_trace") or getattr(node, "stack_trace", None) or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    # stack_trace ends with '  File "x.py", line N, in f' then the code line.
    frames = [ln for ln in lines if ln.startswith("File ")]
    if not frames:
        return ""
    last = frames[-1]
    idx = lines.index(last)
    code = lines[idx + 1] if idx + 1 < len(lines) and not lines[idx + 1].startswith("File ") else ""
    return f"{last}: {code}" if code else last


def describe_node(node: fx.Node) -> str:
    """One line a user can find in their code: node name, op, target and source line."""
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    where = user_line(node)
    text = f"node '{node.name}' ({node.op} {target})"
    return f"{text} at {where}" if where else text

