"""The composition root: compile_prune as one short pipeline of named stages."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import numpy as np
import torch
import torch.fx as fx
from tqdm.auto import tqdm
from torch import nn

from obafx.batches import BatchSource, scored_with, warn_once
from obafx.latency_budget import LatencyBudget, check_request
from obafx.passes.channel_graph import analyze
from obafx.passes.coupling import couple
from obafx.passes.errors import BudgetError, ConfigError, ObafxError
from obafx.passes.facts import Budget, ChannelFacts, Coupling, PrunePlan, ScoreContext, Traced
from obafx.passes.fit import TOLERANCE, fit_budget
from obafx.passes.hvp import DEFAULT_MODE
from obafx.passes.importance import NORMALIZERS, criterion, needs_data, unit_scores
from obafx.passes.capture import capture as capture_graph, capture_kind
from obafx.passes.macs import MacModel, counter_name, flop_macs, param_count, thop_macs
from obafx.passes.plan import plan_from_removed
from obafx.passes.ranking import per_cost, unit_costs
from obafx.passes.recalibrate import has_batchnorm, recalibrated
from obafx.passes.rewrite import rewrite
from obafx.passes.select import select
from obafx.passes.uniform import uniform_coupling
from obafx.passes.verify import masked_output, max_relative_error
from obafx.report import Report, attach, input_spec


def compile_prune(model: nn.Module, example_input: Any, *, macs: Optional[float] = None,
                  channels: Optional[float] = None, importance: Any = "magnitude", data: Optional[Iterable] = None,
                  loss_fn: Optional[Callable] = None, steps: int = 1, batches_per_step: Optional[int] = None,
                  ignore: Iterable[str] = (), round_to: int = 1, max_layer_ratio: float = 0.95,
                  leaf_modules: Iterable[Any] = (), mode: str = DEFAULT_MODE, delta: float = 0.0,
                  train: bool = False, seed: int = 0, progress: bool = False, verify: bool = True,
                  structure: str = "structured", sparsity: Optional[float] = None, latency: Any = None,
                  latency_options: Any = None, on_stage: Optional[Callable[[str, Any], None]] = None,
                  recalibrate: Optional[bool] = None, normalizer: Optional[str] = "max", rank: str = "score",
                  probes: int = 1, capture: str = "auto", counter: Optional[str] = None,
                  uniform: bool = False) -> fx.GraphModule:
    """Prune ``model`` structurally and return a new, physically smaller GraphModule (``model`` is untouched).

    Budget: ``macs`` = fraction of the original MACs (``counter``, on ``example_input``) to keep, or ``channels`` =
    fraction of prunable channels to remove, or ``latency`` = fraction of the dense model's MEASURED latency to keep
    (0.5, or a speed-up as a string: "2x"), timed as ``latency_options`` (obafx.LatencyOptions: device, dtype,
    threads, "eager"/"compile"; the batch is the example input's) says. ``importance``: "magnitude", "random",
    "oba", "oba_group" (the loss change of removing each unit alone, passes/group_scores.py), "taylor", "obd",
    "fisher" or a callable. ``steps`` > 1 prunes iteratively toward the budget on the exponential schedule of
    OBA, re-scoring on fresh batches from ``data`` before each step. ``ignore``: module names whose widths stay.
    ``on_stage(name, facts)`` is called after every stage (the place for dumps). See obafx.report(pruned).
    ``structure="unstructured"`` with ``sparsity=`` zeroes that fraction of Conv/Linear weights instead (a traced
    copy of the same size; importance "oba" or "magnitude"); the report holds the sparsity per weight.

    ``recalibrate``: after every step (and after the last) reset the BatchNorm running statistics and
    re-estimate them on that step's calibration batches (train-mode forward, no gradients), so that the next
    step scores the pruned network, not one with the unpruned network's statistics. None (default) = on when
    ``data`` is given, the model has BatchNorm and scoring is in eval mode (``train=False``; in train mode the
    scoring copy normalises with each batch's own statistics and needs no running statistics).
    ``normalizer``: how unit scores are scaled within each coupled group before the global ranking: "max"
    (divide by the group's largest |score|, OBA's rule), "mean", "sum" (by the group's mean / sum of |score|),
    None (raw scores comparable across groups: a unit's total over all its slices, in loss units for the
    data-driven criteria, e.g. |g_uᵀθ_u| for Taylor).
    ``rank``: "score" ranks units by (normalised) score; "per_mac" by RAW score divided by what removing the
    unit saves (MACs for macs=/latency= budgets, parameters for channels=; the normalizer is not applied, and
    "mean"/"sum" are refused: a per-group scale would undo the cross-group comparison per_mac rests on).
    ``probes``: Rademacher probes per batch for importance="oba_group" (one HVP each).
    ``max_layer_ratio`` caps what a layer loses over ALL steps, relative to its original width.
    ``capture``: "auto" (torch.fx's symbolic trace, torch.export where that fails), "fx" or "export"
    (passes/capture.py). ``counter``: what counts MACs, "thop" (module hooks) or "flops" (torch's FlopCounterMode:
    every dispatched matmul, convolution and attention); default "thop" on an fx graph, "flops" on an exported one.
    ``uniform=True``: every layer of a kind keeps the same width (groups whose members differ only by layer index
    lose the same number of units; passes/uniform.py), as a Hugging Face config needs (obafx.to_hf).
    """
    if structure == "unstructured":
        if latency is not None:
            raise ConfigError("latency= is a budget for structured pruning (zeroed weights do not run faster). "
                              "What to do: drop structure='unstructured', or use sparsity= without latency=.")
        return _unstructured(model, example_input, sparsity, importance, data, loss_fn, mode, delta, train,
                             leaf_modules, progress)
    if structure != "structured":
        raise ConfigError(f"structure={structure!r}. What to do: use 'structured' or 'unstructured'.")
    steps, ignore, leaf_modules = _check_args(steps, ignore, leaf_modules)
    _check_options(normalizer, rank, probes, recalibrate, data)
    clock, notes = _Clock(), []
    if latency is None and latency_options is not None:
        raise ConfigError("latency_options= is given without latency=. What to do: ask for a latency budget, e.g. "
                          "latency='2x', or drop latency_options=.")
    wanted = check_request(latency, latency_options, example_input) if latency is not None else None
    budget = Budget(macs, channels, max_layer_ratio, round_to, latency=wanted[0] if wanted else None)
    criterion(importance)  # an unknown name is a ConfigError before any work
    traced = clock("trace", capture_graph, model, example_input, leaf_modules, capture)
    counter = counter_name(counter, capture_kind(traced.gm))
    count = thop_macs if counter == "thop" else flop_macs  # read here, not in macs.py: tests count the calls
    timing = LatencyBudget(*wanted, traced.gm, traced.inputs) if wanted else None
    hook = on_stage or (lambda name, facts: None)
    facts0 = clock("analyze", analyze, traced)
    coupling0 = clock("couple", couple, facts0, ignore)
    hook("couple", coupling0)
    macs = clock("measure", _measure_original, traced, count)
    if budget.macs is not None and macs[0] <= 0 and coupling0.groups:  # without groups select says so
        raise BudgetError(f"macs={budget.macs} asks for a fraction of the MACs, and the '{counter}' counter sees no "
                          "compute in this model on the example input. What to do: use counter='flops' (torch's "
                          "FlopCounterMode sees every dispatched matmul and convolution), or a channels= budget.")
    source = BatchSource(data, steps, traced.inputs, batches_per_step)
    if source.note and needs_data(importance):
        warn_once(source.note)
        notes.append(source.note)
    if recalibrate is None:
        recalibrate = data is not None and not train and has_batchnorm(traced.gm)
    run = _Run(budget, steps, macs[0], importance, source, ignore, sum(g.width for g in coupling0.groups), clock,
               hook, notes, verify, timing, {g.id: g.width for g in coupling0.groups}, rank, bool(recalibrate),
               count, uniform)
    current, known, plan, errors = traced, _Known(facts0, coupling0, macs), PrunePlan(), []
    for step in tqdm(range(1, steps + 1), desc="obafx pruning steps", disable=not progress or steps < 2):
        ctx = ScoreContext(None, loss_fn, mode, delta, train, seed + step, progress,
                           normalizer=None if rank == "per_mac" else normalizer, probes=probes)
        current, known, step_plan, error = _prune_step(run, current, known, step, ctx)
        plan, errors = plan.compose(step_plan), errors + [error]
    pruned = current.gm
    macs1 = known.macs[0] if known.macs else clock("measure", count, pruned, traced.inputs)[0]
    rep = _report(traced, pruned, coupling0, plan, run.macs0, macs1, importance, steps,
                  max(errors) if verify and errors else None, notes, clock, scored_with(importance, loss_fn, source),
                  counter)
    if timing is not None:
        rep = replace(rep, latency=timing.report())
    attach(pruned, rep)
    hook("report", rep)
    return pruned


@dataclass(frozen=True)
class _Run:
    """What every step of one compile_prune call shares: the settings, the original MACs, unit count and group
    widths (id -> width, for the per-layer cap), the stage clock, the user's stage hook, the notes for the
    report, the ranking rule and whether to recalibrate BatchNorm after each step."""

    budget: Budget
    steps: int
    macs0: float
    importance: Any
    source: BatchSource
    ignore: list
    units0: int
    clock: "_Clock"
    hook: Callable
    notes: list
    verify: bool
    latency: Optional[LatencyBudget] = None
    widths0: Dict[str, int] = field(default_factory=dict)
    rank: str = "score"
    recalibrate: bool = False
    count: Callable = thop_macs  # (module, inputs) -> (total MACs, MACs per layer): thop_macs or flop_macs
    uniform: bool = False  # every layer of a kind keeps the same width


@dataclass(frozen=True)
class _Known:
    """What is already computed for the module a step starts from, so that no stage runs twice: the first step
    reuses compile_prune's analysis, and every step reuses the thop count (total, per module) of the rewrite that
    produced its module."""

    facts: Optional[ChannelFacts] = None
    coupling: Optional[Coupling] = None
    macs: Optional[Tuple[float, Dict[str, float]]] = None


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


def _prune_step(run: _Run, current: Traced, known: _Known, step: int, ctx: ScoreContext):
    """One step: analyse the current module, score, select toward this step's target, rewrite, and check the
    result against the current module with the removed units masked (the masking oracle). Returns the new module,
    what is known of it, this step's plan and the oracle's error."""
    clock = run.clock
    facts = known.facts if known.facts is not None else clock("analyze", analyze, current)
    coupling = known.coupling if known.coupling is not None else clock("couple", couple, facts, run.ignore)
    wants = needs_data(run.importance) or callable(run.importance)  # a callable gets the batches there are
    batches = run.source.for_step() if wants else None
    scores = clock("score", unit_scores, run.importance, current.gm, coupling, replace(ctx, batches=batches))
    run.hook("score", scores)
    per_module = None
    if run.budget.channels is None:
        per_module = (known.macs or clock("measure", run.count, current.gm, current.inputs))[1]
    if run.rank == "per_mac":
        scores = clock("score", per_cost, scores, unit_costs(current.gm, coupling, per_module))
    now = sum(g.width for g in coupling.groups)  # units before uniform bundles them (a channels= budget's count)
    if run.uniform:
        coupling, scores = uniform_coupling(coupling, scores)

    def rewritten(removed):
        return clock("rewrite", rewrite, current, coupling, facts.shapes, removed)

    if run.budget.channels is not None:
        removed = clock("select", _select_channels, coupling, scores, run.budget, step, run.steps, run.units0,
                        run.widths0, now)
        gm, macs = rewritten(removed), None
    elif run.latency is not None:
        removed, gm = _fit_latency(run, current, facts, coupling, scores, step, rewritten)
        macs = None
    else:
        target = run.macs0 * run.budget.macs ** (step / run.steps)
        measured = {}  # module -> (total, per module): the next step's MAC model reuses it

        def measure(gm):
            measured[gm] = clock("measure", run.count, gm, current.inputs)
            return measured[gm][0]

        removed, gm = _fit(coupling, scores, run.budget, target, MacModel(coupling, per_module).estimate,
                           rewritten, measure, run.notes, clock, widths0=run.widths0)
        macs = measured[gm]
    run.hook("rewrite", gm)
    plan = plan_from_removed(coupling, removed)
    error = None
    if run.verify:
        error = clock("verify", lambda: max_relative_error(masked_output(current, coupling, removed, plan=plan),
                                                           _run_eval(gm, current.inputs)))
    if run.recalibrate:  # after the oracle: it compares against the current module's statistics
        how = getattr(run.importance, "recalibrated", recalibrated)  # distributed_importance brings its own
        gm = clock("recalibrate", how, gm, batches if batches is not None else run.source.for_step())
    return Traced(gm, current.inputs), _Known(macs=macs), plan, error


def _measure_original(traced: Traced, count=thop_macs):
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


def _run_eval(gm, inputs):
    was = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            return gm(*inputs)
    finally:
        gm.train(was)


def _check_options(normalizer, rank, probes, recalibrate, data) -> None:
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
    if recalibrate not in (None, True, False):
        raise ConfigError(f"recalibrate={recalibrate!r}. What to do: pass None (automatic), True or False.")
    if recalibrate and data is None:
        raise ConfigError("recalibrate=True needs calibration batches. What to do: pass data=<iterable of batches>.")


def _select_channels(coupling, scores, budget: Budget, step: int, steps: int, units0: int, widths0=None,
                     now=None):
    """This step's share of a channel budget: the schedule's cumulative fraction of the ORIGINAL units (``now``:
    the units there are, where ``coupling`` bundles several into one)."""
    now = now if now is not None else sum(g.width for g in coupling.groups)
    goal = units0 * (1 - budget.channels) ** (step / steps)  # units left after this step
    fraction = max(0.0, min(1.0, (now - goal) / max(now, 1)))
    return select(coupling, scores, Budget(channels=fraction or 1e-12, max_layer_ratio=budget.max_layer_ratio,
                                           round_to=budget.round_to), widths0=widths0)


def _fit(coupling, scores, budget: Budget, target: float, estimate, build, measure, notes, clock, what="MAC",
         tolerance: float = TOLERANCE, widths0=None, rounds: int = 12):
    """Select toward an absolute ``target`` of a measured cost: the per-layer ``estimate(removed)`` ranks and picks
    the units, ``build(removed) -> module`` and ``measure(module) -> cost`` check the candidate, and fit_budget
    corrects the aim until the cost is within the tolerance on both sides. A miss is warned about and noted in the
    report (the closest feasible candidate is kept); ``rounds`` caps the candidates built. Returns (removed units,
    module)."""
    fitted = fit_budget(target, lambda aim: clock("select", select, coupling, scores, budget, estimate, aim, widths0),
                        build, measure, what=what, tolerance=tolerance, rounds=rounds)
    if fitted.note:
        warn_once(fitted.note)
        notes.append(fitted.note)
    return set(fitted.removed), fitted.module


def _fit_latency(run: _Run, current: Traced, facts, coupling, scores, step: int, build):
    """A step of a latency budget: the cost model of ``current`` selects, the alternating end-to-end measurement
    against the dense module corrects (costs are fractions of the dense latency). Returns (removed, module)."""
    lat, clock = run.latency, run.clock
    estimate = clock("latency model", lat.estimator, current, facts, coupling)
    target = lat.target(step, run.steps)
    try:
        removed, gm = _fit(coupling, scores, run.budget, target, estimate, build,
                           lambda gm: clock("latency measure", lat.measure, gm), run.notes, clock, what="latency",
                           tolerance=lat.options.tolerance, widths0=run.widths0, rounds=lat.options.candidates)
    except BudgetError as exc:
        raise BudgetError(f"latency={lat.fraction:.3g} ({1 / lat.fraction:.2f}x) cannot be reached: removing every "
                          f"removable channel still leaves more than {target:.3g} of the dense latency by the cost "
                          "model. What to do: ask for a smaller speed-up, raise max_layer_ratio, or drop ignore= "
                          f"entries. ({exc})") from None
    note = lat.accept(gm, target)
    if note:
        warn_once(note)
        run.notes.append(note)
    return removed, gm


def _report(traced, pruned, coupling0, plan, macs0, macs1, importance, steps, error, notes, clock,
            scored, counter="thop") -> Report:
    groups = [{"id": g.id, "width_before": g.width, "width_after": _width_after(g, plan, coupling0),
               "members": [f"{n}:{d}" for n, d in g.members]} for g in coupling0.groups]
    return Report(param_count(traced.gm), param_count(pruned), macs0, macs1,
                  importance if isinstance(importance, str) else getattr(importance, "__name__", "custom"),
                  int(steps), groups, list(coupling0.barriers), plan.to_dict(), error, notes, clock.totals,
                  inputs=input_spec(traced.inputs), scored_with=scored, counter=counter,
                  capture=capture_kind(traced.gm))


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
