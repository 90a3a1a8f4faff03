"""The composition root: compile_prune as one short pipeline of named stages."""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
import torch.fx as fx
from tqdm.auto import tqdm
from torch import nn

from obafx.batches import BatchSource, warn_once
from obafx.passes.channel_graph import analyze
from obafx.passes.coupling import couple
from obafx.passes.errors import ConfigError
from obafx.passes.facts import PrunePlan
from obafx.passes.importance import ScoreContext, unit_scores
from obafx.passes.macs import MacModel, param_count, thop_macs
from obafx.passes.plan import plan_from_removed
from obafx.passes.rewrite import rewrite
from obafx.passes.select import Budget, select
from obafx.passes.trace import Traced, trace
from obafx.passes.verify import masked_output, max_relative_error
from obafx.report import Report, attach, input_spec

_MAC_TOLERANCE = 0.01  # re-select when thop says the step missed its MAC target by more than this


def compile_prune(model: nn.Module, example_input: Any, *, macs: Optional[float] = None,
                  channels: Optional[float] = None, importance: Any = "magnitude", data: Optional[Iterable] = None,
                  loss_fn: Optional[Callable] = None, steps: int = 1, batches_per_step: Optional[int] = None,
                  ignore: Iterable[str] = (), round_to: int = 1, max_layer_ratio: float = 0.95,
                  leaf_modules: Iterable[Any] = (), mode: str = "full", delta: float = 0.0, train: bool = False,
                  seed: int = 0, progress: bool = False, verify: bool = True, structure: str = "structured",
                  sparsity: Optional[float] = None,
                  on_stage: Optional[Callable[[str, Any], None]] = None) -> fx.GraphModule:
    """Prune ``model`` structurally and return a new, physically smaller GraphModule (``model`` is untouched).

    Budget: ``macs`` = fraction of the original MACs (thop, on ``example_input``) to keep, or ``channels`` =
    fraction of prunable channels to remove. ``importance``: "magnitude", "random", "oba", "taylor", "obd",
    "fisher" or a callable. ``steps`` > 1 prunes iteratively toward the budget on the exponential schedule of
    OBA, re-scoring on fresh batches from ``data`` before each step. ``ignore``: module names whose widths stay.
    ``on_stage(name, facts)`` is called after every stage (the place for dumps). See obafx.report(pruned).
    ``structure="unstructured"`` with ``sparsity=`` zeroes that fraction of Conv/Linear weights instead (a traced
    copy of the same size; importance "oba" or "magnitude"); the report holds the sparsity per weight.
    """
    if structure == "unstructured":
        return _unstructured(model, example_input, sparsity, importance, data, loss_fn, mode, delta, train,
                             leaf_modules, progress)
    if structure != "structured":
        raise ConfigError(f"structure={structure!r}. What to do: use 'structured' or 'unstructured'.")
    steps, ignore, leaf_modules = _check_args(steps, ignore, leaf_modules)
    clock, notes = _Clock(), []
    budget = Budget(macs, channels, max_layer_ratio, round_to)
    _check_importance(importance)
    traced = clock("trace", trace, model, example_input, leaf_modules)
    hook = on_stage or (lambda name, facts: None)
    coupling0 = clock("couple", couple, clock("analyze", analyze, traced), ignore)
    hook("couple", coupling0)
    macs0, _ = thop_macs(traced.gm, traced.inputs)
    source = BatchSource(data, steps, traced.inputs, batches_per_step)
    if source.note and _needs_data(importance):
        warn_once(source.note)
        notes.append(source.note)
    units0 = sum(g.width for g in coupling0.groups)
    current, plan, errors = traced, PrunePlan(), []
    for step in tqdm(range(1, steps + 1), desc="obafx pruning steps", disable=not progress or steps < 2):
        ctx = ScoreContext(None, loss_fn, mode, delta, train, seed + step, progress)
        current, step_plan, error = _prune_step(current, budget, step, steps, macs0, importance, source, ctx,
                                                ignore, units0, clock, hook, notes, verify)
        plan, errors = plan.compose(step_plan), errors + [error]
    pruned = current.gm
    rep = _report(traced, pruned, coupling0, plan, macs0, importance, steps,
                  max(errors) if verify and errors else None, notes, clock)
    attach(pruned, rep)
    hook("report", rep)
    return pruned


def _check_args(steps, ignore, leaf_modules):
    """Validate the loop count and accept a single name where a list of names is expected."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps={steps!r}. What to do: pass a positive integer (1 = one-shot pruning).")
    ignore = [ignore] if isinstance(ignore, str) else list(ignore)
    leaf_modules = [leaf_modules] if isinstance(leaf_modules, (str, type)) else list(leaf_modules)
    return steps, ignore, leaf_modules


def _unstructured(model, example_input, sparsity, importance, data, loss_fn, mode, delta, train, leaf_modules,
                  progress):
    from obafx.unstructured_api import prune_unstructured

    if sparsity is None:
        raise ConfigError("structure='unstructured' needs sparsity=<fraction of weights to zero>.")
    return prune_unstructured(model, example_input, sparsity=sparsity, importance=importance, data=data,
                              loss_fn=loss_fn, mode=mode, delta=delta, train=train, leaf_modules=leaf_modules,
                              progress=progress)


def _prune_step(current: Traced, budget: Budget, step: int, steps: int, macs0: float, importance: Any,
                source: BatchSource, ctx: ScoreContext, ignore, units0: int, clock, hook, notes, verify: bool):
    """One step: analyse the current module, score, select toward this step's target, rewrite, and check the
    result against the current module with the removed units masked (the masking oracle)."""
    facts = clock("analyze", analyze, current)
    coupling = clock("couple", couple, facts, ignore)
    ctx = ScoreContext(source.for_step() if _needs_data(importance) or callable(importance) else None, *_rest(ctx))
    scores = clock("score", unit_scores, importance, current.gm, coupling, ctx)
    hook("score", scores)
    if budget.channels is not None:
        removed = _select_channels(coupling, scores, budget, step, steps, units0)
    else:
        removed = clock("select", _select_macs, current, coupling, facts.shapes, scores, budget,
                        macs0 * budget.macs ** (step / steps), notes)
    gm = clock("rewrite", rewrite, current, coupling, facts.shapes, removed)
    hook("rewrite", gm)
    error = None
    if verify:
        error = clock("verify", lambda: max_relative_error(masked_output(current, coupling, removed),
                                                           _run_eval(gm, current.inputs)))
    return Traced(gm, current.inputs), plan_from_removed(coupling, removed), error


def _run_eval(gm, inputs):
    was = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            return gm(*inputs)
    finally:
        gm.train(was)


def _needs_data(importance: Any) -> bool:
    return isinstance(importance, str) and importance not in ("magnitude", "random")


def _check_importance(importance: Any) -> None:
    from obafx.passes.importance import CRITERIA

    if not callable(importance) and importance not in CRITERIA:
        raise ConfigError(f"importance={importance!r} is unknown. What to do: use one of {sorted(CRITERIA)} or a "
                          "callable (model, coupling, ctx) -> {unit: score}.")


def _rest(ctx: ScoreContext):
    return (ctx.loss_fn, ctx.mode, ctx.delta, ctx.train, ctx.seed, ctx.progress, ctx.chunk_size)


def _select_channels(coupling, scores, budget: Budget, step: int, steps: int, units0: int):
    """This step's share of a channel budget: the schedule's cumulative fraction of the ORIGINAL units."""
    now = sum(g.width for g in coupling.groups)
    goal = units0 * (1 - budget.channels) ** (step / steps)  # units left after this step
    fraction = max(0.0, min(1.0, (now - goal) / max(now, 1)))
    return select(coupling, scores, Budget(channels=fraction or 1e-12, max_layer_ratio=budget.max_layer_ratio,
                                           round_to=budget.round_to))


def _select_macs(current: Traced, coupling, shapes, scores, budget: Budget, target: float, notes):
    """Select toward an absolute MAC target, correcting the per-layer estimate with thop measurements."""
    _, per_module = thop_macs(current.gm, current.inputs)
    model = MacModel(coupling, per_module)
    aim = target
    for _ in range(8):
        removed = select(coupling, scores, budget, model.estimate, aim)
        measured, _ = thop_macs(rewrite(current, coupling, shapes, removed), current.inputs)
        if measured <= target * (1 + _MAC_TOLERANCE) or not removed:
            return removed
        aim *= 0.999 * target / measured
    note = f"a step kept {measured / target:.3f}x its MAC target after 8 corrections (coarse channel groups)"
    warn_once(note)
    notes.append(note)
    return removed


def _report(traced, pruned, coupling0, plan, macs0, importance, steps, error, notes, clock) -> Report:
    groups = [{"id": g.id, "width_before": g.width, "width_after": _width_after(g, plan, coupling0),
               "members": [f"{n}:{d}" for n, d in g.members]} for g in coupling0.groups]
    macs1, _ = thop_macs(pruned, traced.inputs)
    return Report(param_count(traced.gm), param_count(pruned), macs0, macs1,
                  importance if isinstance(importance, str) else getattr(importance, "__name__", "custom"),
                  int(steps), groups, list(coupling0.barriers), plan.to_dict(), error, notes, clock.totals,
                  inputs=input_spec(traced.inputs))


def _width_after(group, plan: PrunePlan, coupling) -> int:
    """A group's width in the result, read off its root slot (the plan is in original indices; a slot may also
    hold other groups' units, and a unit may span several positions, e.g. a depthwise multiplier)."""
    name, dim = group.members[0]
    kept = plan.kept.get(name, {}).get(dim)
    if kept is None:
        return group.width
    mine = np.isin(coupling.slot_units[(name, dim)], np.asarray(group.units))
    per_unit = mine.sum() / group.width
    return int(round(mine[list(kept)].sum() / per_unit))


class _Clock:
    """Times each named stage (sums over steps)."""

    def __init__(self):
        self.totals = {}

    def __call__(self, name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start
