"""Calibration batches per pruning step: fresh batches for every step, drawn from what the user gave."""
from __future__ import annotations

import itertools
import warnings
from typing import Any, Iterator, List, Optional, Sequence

from obafx.passes.importance import criterion


class BatchSource:
    """Hands out the batches for each step. A sequence is split evenly over the steps (cycling if it is shorter
    than the number of steps); any other iterable (a DataLoader) is drawn from, ``per_step`` batches a step, and
    restarted when exhausted. With no data, the example input is scored against the model's own predictions."""

    def __init__(self, data: Optional[Any], steps: int, example_inputs: Sequence[Any], per_step: Optional[int]):
        self.steps = steps
        self.note: Optional[str] = None
        self.given = data is not None
        self.first: Any = None  # the first batch handed out (the report says what it carried)
        if data is None:
            self.note = ("no calibration data given: scores use the example input with the model's own "
                         "predictions as labels")
            single = example_inputs[0] if len(example_inputs) == 1 else tuple(example_inputs)
            self._fixed: Optional[List[Any]] = [single]
            return
        self._fixed = None
        if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
            self._seq = list(data)
            if not self._seq:
                from obafx.passes.errors import ConfigError
                raise ConfigError("data= is empty. What to do: pass a list or DataLoader of (inputs, targets) batches.")
            self._per = per_step or max(1, len(self._seq) // steps)
            self._offset = 0
        else:
            self._data = data
            self._iter: Iterator = iter(data)
            self._per = per_step or 8

    def for_step(self) -> List[Any]:
        """The batches for the next step."""
        out = self._next()
        if self.first is None and out:
            self.first = out[0]
        return out

    def _next(self) -> List[Any]:
        if self._fixed is not None:
            return self._fixed
        if hasattr(self, "_seq"):
            out = [self._seq[(self._offset + i) % len(self._seq)] for i in range(self._per)]
            self._offset += self._per
            return out
        out = list(itertools.islice(self._iter, self._per))
        if len(out) < self._per:
            self._iter = iter(self._data)
            out += list(itertools.islice(self._iter, self._per - len(out)))
        return out


def scored_with(importance: Any, loss_fn: Optional[Any], source: BatchSource) -> str:
    """What the scores were computed from, in words, for the report: the loss and the targets of the batches
    (read as the scorer reads them: a 2-item list/tuple is (inputs, targets), anything else inputs only)."""
    if isinstance(importance, str) and importance in ("magnitude", "random"):
        return f"no data: {importance} scores need none"
    if source.first is None:
        return "no data: no batch was scored"
    loss = "cross_entropy (default)" if loss_fn is None else getattr(loss_fn, "__name__", type(loss_fn).__name__)
    how = "" if isinstance(importance, str) else "a custom criterion given these batches; "
    if not source.given:
        return (f"{how}no data: the example input, loss {loss}, targets = the model's own argmax predictions "
                "(pass data= with (inputs, targets) batches to use labels)")
    batch = source.first
    targets = batch[1] if isinstance(batch, (tuple, list)) and len(batch) == 2 else None
    if targets is None:
        return f"{how}data= batches, loss {loss}, targets = the model's own argmax predictions (the batches carry none)"
    return f"{how}data= batches, loss {loss}, targets = the labels in the batches"


def scoring_settings(importance: Any, mode: str, train: bool, unit_sum: str, rank: str,
                     normalizer: Optional[str], probes: int = 1, confidence: float = 0.0) -> str:
    """How a data-driven criterion's scores were computed and ranked, in words, for the report ("" for the others):
    the scoring mode (train: BatchNorm on each batch's statistics), OBA's Hessian, the unit sum, the ranking."""
    entry = criterion(importance)
    if entry is None or not entry.needs_data:
        return ""
    parts = ["train mode (BatchNorm on each batch's statistics)" if train else "eval mode (running statistics)"]
    if importance in ("oba", "oba_group"):
        parts.append(f"mode={mode}")
    if importance == "oba_group":
        parts.append(f"probes={probes}, confidence={confidence:g}")
    if entry.parameters is not None:  # unit_sum adds up per-parameter scores
        parts.append(f"unit_sum={unit_sum}")
    parts.append(f"rank={rank}" + (f", normalizer={normalizer}" if rank == "score" else ""))
    return "; " + ", ".join(parts)


def warn_once(message: str) -> None:
    warnings.warn(f"obafx: {message}", stacklevel=3)
