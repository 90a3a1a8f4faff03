"""Calibration batches per pruning step: fresh batches for every step, drawn from what the user gave."""
from __future__ import annotations

import itertools
import warnings
from typing import Any, Iterator, List, Optional, Sequence


class BatchSource:
    """Hands out the batches for each step. A sequence is split evenly over the steps (cycling if it is shorter
    than the number of steps); any other iterable (a DataLoader) is drawn from, ``per_step`` batches a step, and
    restarted when exhausted. With no data, the example input is scored against the model's own predictions."""

    def __init__(self, data: Optional[Any], steps: int, example_inputs: Sequence[Any], per_step: Optional[int]):
        self.steps = steps
        self.note: Optional[str] = None
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


def warn_once(message: str) -> None:
    warnings.warn(f"obafx: {message}", stacklevel=3)
