"""compile_prune's stages as plain, named calls: ``stage(name)(fn)`` is ``fn`` that, while a `recording` is
open, adds its run time to ``seconds[name]`` (summed over steps and candidates) and hands its result to the
user's ``on_stage(name, result)``. Outside a recording it is just ``fn``.

So the pipeline in api.py reads as calls (``facts = analyze(traced)``), and timing and the hook are handled in
one place, for every stage alike.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import time
from typing import Any, Callable, Dict, Iterator, Optional

import torch

from obafx.passes.capture import capture as _capture
from obafx.passes.renormalize import refit_norms
from obafx.passes.channel_graph import analyze as _analyze
from obafx.passes.coupling import couple as _couple
from obafx.passes.importance import unit_scores as _unit_scores
from obafx.passes.ranking import per_cost as _per_cost
from obafx.passes.rewrite import rewrite as _rewrite
from obafx.passes.select import select as _select
from obafx.passes.tensors import eval_mode
from obafx.passes.verify import masked_output, max_relative_error

_CURRENT: contextvars.ContextVar = contextvars.ContextVar("obafx_recording", default=None)


class Recording:
    """One compile_prune call's stage times (name -> seconds) and its ``on_stage`` hook."""

    def __init__(self, on_stage: Optional[Callable[[str, Any], None]] = None):
        self.seconds: Dict[str, float] = {}
        self.on_stage = on_stage

    def finished(self, name: str, seconds: float, result: Any) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        if self.on_stage is not None:
            self.on_stage(name, result)


@contextlib.contextmanager
def recording(on_stage: Optional[Callable[[str, Any], None]] = None) -> Iterator[Recording]:
    """Open a recording for the stages run inside the block (one per compile_prune call; calls nest safely)."""
    rec = Recording(on_stage)
    token = _CURRENT.set(rec)
    try:
        yield rec
    finally:
        _CURRENT.reset(token)


def stage(name: str) -> Callable[[Callable], Callable]:
    """Decorator: the function, timed under ``name`` and reported to ``on_stage`` after each successful run."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            rec = _CURRENT.get()
            if rec is None:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            except BaseException:
                rec.seconds[name] = rec.seconds.get(name, 0.0) + time.perf_counter() - start
                raise
            rec.finished(name, time.perf_counter() - start, result)
            return result
        run.stage_name = name
        return run
    return wrap


# ------------------------------------------------------------------ the stages compile_prune runs, by name

trace = stage("trace")(_capture)
analyze = stage("analyze")(_analyze)
couple = stage("couple")(_couple)
score = stage("score")(_unit_scores)
rank = stage("rank")(_per_cost)
select = stage("select")(_select)
rewrite = stage("rewrite")(_rewrite)


@stage("measure")
def measure(count: Callable, module, inputs):
    """``count(module, inputs) -> (total MACs, MACs per layer)`` (thop or FlopCounterMode)."""
    return count(module, inputs)


@stage("verify")
def verify(current, coupling, removed, plan, pruned) -> float:
    """The masking oracle: the largest relative difference between ``pruned``'s output and ``current``'s with the
    ``removed`` units zeroed (eval mode, no grad)."""
    with eval_mode(pruned), torch.no_grad():
        out = pruned(*current.inputs)
    return max_relative_error(masked_output(current, coupling, removed, plan=plan), out)


@stage("recalibrate")
def recalibrate(how: Callable, module, batches):
    """``how(module, batches)``: BatchNorm statistics re-estimated on ``batches`` (a new module)."""
    return how(module, batches)


@stage("renormalize")
def renormalize(module, widths_before, batches, summed=None):
    """LayerNorms/RMSNorms that lost channels refit on ``batches`` to act as the zeroed network's (a new module;
    ``module`` itself when none lost channels): passes/renormalize.py."""
    return refit_norms(module, widths_before, batches, summed)


@stage("report")
def report(build: Callable, *args):
    """The report of the run (``build(*args)``), handed to on_stage as the last stage."""
    return build(*args)
