"""The choices inside one compile_prune step, and its argument checks: a channel budget's share of a step,
fitting a MAC or latency budget (passes/fit.py's loop with the right selection, build and measure), the first
real run of the model, and the report. Stages they run go through obafx/stages.py (timed, on_stage).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import numpy as np
import torch

from obafx import stages as S
from obafx.batches import warn_once
from obafx.latency_budget import LatencyBudget
from obafx.passes.capture import capture_kind
from obafx.passes.errors import BudgetError, ConfigError, ObafxError
from obafx.passes.facts import Budget, PrunePlan, Traced
from obafx.passes.fit import TOLERANCE, fit_budget
from obafx.passes.group_scores import check_confidence
from obafx.passes.importance import NORMALIZERS
from obafx.passes.macs import param_count
from obafx.report import Report, input_spec
from obafx.stages import stage


def check_args(steps, ignore, leaf_modules):
    """Validate the loop count and accept a single name where a list of names is expected."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps={steps!r}. What to do: pass a positive integer (1 = one-shot pruning).")
    ignore = [ignore] if isinstance(ignore, str) else list(ignore)
    leaf_modules = [leaf_modules] if isinstance(leaf_modules, (str, type)) else list(leaf_modules)
    return steps, ignore, leaf_modules


def check_options(normalizer, rank, probes, recalibrate, data, confidence=0.0) -> None:
    """The scoring and ranking options of compile_prune, with what to pass instead."""
    if normalizer not in NORMALIZERS:
        raise ConfigError(f"normalizer={normalizer!r}. What to do: use one of {NORMALIZERS}.")
    if rank not in ("score", "per_mac"):
        raise ConfigError(f"rank={rank!r}. What to do: use 'score' or 'per_mac'.")
    if rank == "per_mac" and normalizer not in ("max", None):
        raise ConfigError(f"rank='per_mac' ranks raw scores per MAC saved; normalizer={normalizer!r} would rescale "
                          "each group and undo that. What to do: leave normalizer at its default or pass None.")
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ConfigError(f"probes={probes!r}. What to do: pass a positive integer (Rademacher probes per batch).")
    check_confidence(confidence)
    if recalibrate not in (None, True, False):
        raise ConfigError(f"recalibrate={recalibrate!r}. What to do: pass None (automatic), True or False.")
    if recalibrate and data is None:
        raise ConfigError("recalibrate=True needs calibration batches. What to do: pass data=<iterable of batches>.")


def unstructured(model, example_input, sparsity, importance, data, loss_fn, mode, delta, train, leaf_modules,
                 progress):
    """compile_prune(structure="unstructured"): obafx/unstructured_api.py."""
    from obafx.unstructured_api import prune_unstructured

    if sparsity is None:
        raise ConfigError("structure='unstructured' needs sparsity=<fraction of weights to zero>.")
    return prune_unstructured(model, example_input, sparsity=sparsity, importance=importance, data=data,
                              loss_fn=loss_fn, mode=mode, delta=delta, train=train, leaf_modules=leaf_modules,
                              progress=progress)


@stage("measure")
def measure_original(traced: Traced, count: Callable):
    """``count``'s count (thop or FlopCounterMode) of the traced model: its first real run (the trace may have run
    on meta tensors only, whose kernels skip some checks, e.g. an integer input to a float Linear), so a failure
    here is a bad input."""
    try:
        return count(traced.gm, traced.inputs)
    except ObafxError:
        raise
    except Exception as exc:  # torch raises RuntimeError, TypeError, NotImplementedError... for unfit inputs
        shapes = [(tuple(x.shape), str(x.dtype)) if isinstance(x, torch.Tensor) else type(x).__name__
                  for x in traced.inputs]
        raise ConfigError(f"the model does not run on the example input {shapes}: {type(exc).__name__}: {exc}. "
                          "What to do: pass an example input shaped and typed like one real batch, on the model's "
                          "device.") from exc


def select_channels(coupling, scores, budget: Budget, step: int, steps: int, units0: int, widths0=None,
                    now=None):
    """This step's share of a channel budget: the schedule's cumulative fraction of the ORIGINAL units (``now``:
    the units there are, where ``coupling`` bundles several into one)."""
    now = now if now is not None else sum(g.width for g in coupling.groups)
    goal = units0 * (1 - budget.channels) ** (step / steps)  # units left after this step
    fraction = max(0.0, min(1.0, (now - goal) / max(now, 1)))
    return S.select(coupling, scores, Budget(channels=fraction or 1e-12, max_layer_ratio=budget.max_layer_ratio,
                                             round_to=budget.round_to, keep_narrow=budget.keep_narrow),
                    widths0=widths0)


def fit(coupling, scores, budget: Budget, target: float, estimate, build, measure, what="MAC",
        tolerance: float = TOLERANCE, widths0=None, rounds: int = 12, last: bool = True, blocks=None,
        confirm=None):
    """Select toward an absolute ``target`` of a measured cost: the per-layer ``estimate(removed)`` ranks and picks
    the units, ``build(removed) -> module`` and ``measure(module) -> cost`` check the candidate, and fit_budget
    corrects the aim until the cost is within the tolerance on both sides. A miss is warned about and noted (the
    closest feasible candidate is kept); ``rounds`` caps the candidates built. A step before the ``last`` one
    says nothing: step targets are fractions of the ORIGINAL cost, so the next step corrects its miss. Returns
    (removed units, module, notes: a tuple). ``blocks``: a latency cost model's per-group kernel blocks;
    ``confirm``: a noisy cost's second, pooled measurement (passes/fit.py)."""
    fitted = fit_budget(target, lambda aim: S.select(coupling, scores, budget, estimate, aim, widths0, blocks),
                        build, measure, what=what, tolerance=tolerance, rounds=rounds, confirm=confirm)
    if not (fitted.note and last):
        return set(fitted.removed), fitted.module, ()
    warn_once(fitted.note)
    return set(fitted.removed), fitted.module, (fitted.note,)


def fit_latency(lat: LatencyBudget, budget: Budget, widths0, steps: int, current: Traced, facts, coupling, scores,
                step: int, build):
    """A step of a latency budget: the cost model of ``current`` selects, the alternating end-to-end measurement
    against the dense module corrects (costs are fractions of the dense latency). Returns (removed, module,
    notes)."""
    estimate, blocks = _latency_model(lat, current, facts, coupling)
    target = lat.target(step, steps)
    try:
        removed, gm, notes = fit(coupling, scores, budget, target, estimate, build,
                                 lambda gm: _latency_measure(lat, gm), what="latency",
                                 tolerance=lat.options.tolerance, widths0=widths0, rounds=lat.options.candidates,
                                 last=step == steps, blocks=blocks,
                                 confirm=lambda gm: _latency_measure(lat, gm, again=True))
    except BudgetError:
        every = Budget(channels=1.0, max_layer_ratio=budget.max_layer_ratio, round_to=budget.round_to,
                       keep_narrow=budget.keep_narrow)
        fastest = estimate(S.select(coupling, scores, every, widths0=widths0, blocks=blocks))
        raise BudgetError(f"latency={lat.fraction:.3g} ({1 / lat.fraction:.2f}x) cannot be reached: removing every "
                          f"removable channel (at most {budget.max_layer_ratio:.0%} of each layer) still keeps "
                          f"{fastest:.3g} of the dense latency by the cost model, above the target {target:.3g}. What "
                          "to do: ask for a smaller speed-up, raise max_layer_ratio, or drop ignore= "
                          "entries.") from None
    note = lat.accept(gm, target)
    if note:
        warn_once(note)
        notes = notes + (note,)
    return removed, gm, notes


@stage("latency model")
def _latency_model(lat: LatencyBudget, current: Traced, facts, coupling):
    return lat.estimator(current, facts, coupling)


@stage("latency measure")
def _latency_measure(lat: LatencyBudget, module, again: bool = False) -> float:
    return lat.confirm(module) if again else lat.measure(module)


def build_report(traced, pruned, coupling0, plan, macs0, macs1, importance, steps, error, notes, seconds,
                 scored, counter="thop", latency=None) -> Report:
    """The Report of a structured run (sizes before/after, groups with their widths, barriers, plan, oracle
    error, notes, stage seconds, what the scores came from, the counter and capture, the latency record)."""
    groups = [{"id": g.id, "width_before": g.width, "width_after": _width_after(g, plan, coupling0),
               "members": [f"{n}:{d}" for n, d in g.members]} for g in coupling0.groups]
    rep = Report(param_count(traced.gm), param_count(pruned), macs0, macs1,
                 importance if isinstance(importance, str) else getattr(importance, "__name__", "custom"),
                 int(steps), groups, [dict(b) for b in coupling0.barriers], plan.to_dict(), error, list(notes),
                 dict(seconds), inputs=input_spec(traced.inputs), scored_with=scored, counter=counter,
                 capture=capture_kind(traced.gm))
    return replace(rep, latency=latency) if latency is not None else rep


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
