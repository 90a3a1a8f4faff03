"""The composition root: compile_prune as one short pipeline of named stages.

Each stage is a plain call of a function in obafx/stages.py (``S.analyze(traced)``), which times it into the
report's ``seconds`` and hands its result to ``on_stage``; the per-step choices (budget fitting, arguments) are in
obafx/steps.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch.fx as fx
from tqdm.auto import tqdm
from torch import nn

from obafx import stages as S
from obafx.batches import BatchSource, scored_with, scoring_settings, warn_once
from obafx.latency_budget import LatencyBudget, check_request
from obafx.passes.capture import capture_kind
from obafx.passes.errors import BudgetError, ConfigError
from obafx.passes.facts import Budget, ChannelFacts, Coupling, PrunePlan, ScoreContext, Traced
from obafx.passes.importance import (criterion, needs_data, resolve_confidence, resolve_mode, resolve_probes,
                                     resolve_rank,
                                     resolve_train, resolve_unit_sum)
from obafx.passes.macs import MacModel, counter_name, flop_macs, thop_macs
from obafx.passes.plan import plan_from_removed
from obafx.passes.ranking import unit_costs
from obafx.passes.recalibrate import has_batchnorm, recalibrated
from obafx.passes.renormalize import norm_widths
from obafx.passes.uniform import uniform_coupling, without_kept
from obafx.report import attach
from obafx.steps import (build_report, check_args, check_options, fit, fit_latency, measure_original,
                         select_channels, unstructured)


def compile_prune(model: nn.Module, example_input: Any, *, macs: Optional[float] = None,
                  channels: Optional[float] = None, importance: Any = "magnitude", data: Optional[Iterable] = None,
                  loss_fn: Optional[Callable] = None, steps: int = 1, batches_per_step: Optional[int] = None,
                  ignore: Iterable[str] = (), round_to: int = 1, max_layer_ratio: float = 0.95,
                  leaf_modules: Iterable[Any] = (), mode: Optional[str] = None, delta: float = 0.0,
                  train: Optional[bool] = None, seed: int = 0, progress: bool = False, verify: bool = True,
                  structure: str = "structured", sparsity: Optional[float] = None, latency: Any = None,
                  latency_options: Any = None, on_stage: Optional[Callable[[str, Any], None]] = None,
                  recalibrate: Optional[bool] = None, normalizer: Optional[str] = "max", rank: Optional[str] = None,
                  probes: Optional[int] = None, confidence: Optional[float] = None, capture: str = "auto",
                  counter: Optional[str] = None,
                  uniform: bool = False, keep_widths: Iterable[str] = (),
                  keep_narrow: bool = False, unit_sum: Optional[str] = None) -> fx.GraphModule:
    """Prune ``model`` structurally and return a new, physically smaller GraphModule (``model`` is untouched).

    Budget: ``macs`` = fraction of the original MACs (``counter``, on ``example_input``) to keep, or ``channels`` =
    fraction of prunable channels to remove, or ``latency`` = fraction of the dense model's MEASURED latency to keep
    (0.5, or a speed-up as a string: "2x"), timed as ``latency_options`` (obafx.LatencyOptions: device, dtype,
    threads, "eager"/"compile"; the batch is the example input's) says. ``importance``: "magnitude", "random",
    "oba_group" (OBA's recommended form: the loss change of removing each unit alone, passes/group_scores.py),
    "oba" (the paper's per-parameter criterion as published), "taylor", "obd", "fisher" or a callable. ``steps`` > 1 prunes iteratively toward the budget on the exponential schedule of
    OBA, re-scoring on fresh batches from ``data`` before each step. ``ignore``: module names whose widths stay.
    ``on_stage(name, result)`` is called after every stage run with its result (the place for dumps): "trace",
    "analyze", "couple", "measure", "score", "rank", "select", "rewrite", "verify", "renormalize", "recalibrate",
    "latency model", "latency measure" and, last, "report" (select, rewrite and measure once per candidate a
    budget tries).
    See obafx.report(pruned).
    ``structure="unstructured"`` with ``sparsity=`` zeroes that fraction of Conv/Linear weights instead (a traced
    copy of the same size; importance "oba" or "magnitude"); the report holds the sparsity per weight.

    ``train``: score in train mode (BatchNorm on each batch's own statistics, dropout active) or eval mode (running
    statistics). None (default) = True for importance="oba" and "oba_group" (the paper's code scores so, and the
    accuracy benchmark favours it: README), False for the other criteria.
    ``mode``: OBA's Hessian, "full" (the loss Hessian H) or "residual" (H − G, G its Gauss-Newton part); None
    (default) = "residual" for importance="oba" (the paper's criterion), "full" for "oba_group" (its score is the
    loss change of removing a unit, and H is what predicts it: benchmarks/score_truth.py).
    ``recalibrate``: after every step (and after the last) reset the BatchNorm running statistics and
    re-estimate them on that step's calibration batches (train-mode forward, no gradients), so that an eval-mode
    step scores the pruned network, not one with the unpruned network's statistics, and the result carries
    statistics of its own; and refit every LayerNorm/RMSNorm whose normalised dim lost channels so that it acts
    as the zeroed network's norm (which divides by the old width: passes/renormalize.py; without it the kept
    outputs shrink by ~sqrt(new/old width) and the pruned network is not the one the scores judged). None
    (default) = on when ``data`` is given and the model has BatchNorm, LayerNorm or RMSNorm.
    ``normalizer``: how unit scores are scaled within each coupled group before the global ranking: "max"
    (divide by the group's largest |score|, OBA's rule), "mean", "sum" (by the group's mean / sum of |score|),
    None (raw scores comparable across groups: a unit's total over all its slices, in loss units for the
    data-driven criteria, e.g. |g_uᵀθ_u| for Taylor).
    ``rank``: None (default) = "per_mac" for "oba" and "oba_group", "score" for every other criterion; "score" ranks
    units by (normalised) score; "per_mac" by RAW score divided by what removing the
    unit saves (MACs for macs=/latency= budgets, parameters for channels=; the normalizer is not applied, and
    "mean"/"sum" are refused: a per-group scale would undo the cross-group comparison per_mac rests on).
    ``probes``: Rademacher probes per batch for importance="oba_group" (one HVP each); None (default) = 4.
    ``confidence``: for importance="oba_group", rank each unit by its mean loss change plus this many standard
    errors of the mean over the batch x probe samples (an upper confidence bound: a unit goes early only when it
    is cheap with confidence); None (default) = 2.0 for "oba_group"; 0 = the plain mean.
    ``unit_sum``: how a data-driven criterion's per-parameter scores s_i (already averaged over batches) add up
    over a unit's slices: "signed" (|Σ s_i| over the whole unit, for Taylor the loss change |g_uᵀθ_u| of removing
    the unit), "abs" (Σ |s_i|, as Torch-Pruning's Taylor does: nothing cancels inside a unit, so a small
    calibration set ranks far more steadily; benchmarks/score_noise.py) or "member" (OBA.md section 3's rule:
    each member's slice summed with its signs, the members' magnitudes added, Σ_m |Σ_{i∈m} s_i|; README).
    None (default) = "member" for importance="oba", "signed" for the other criteria.
    ``max_layer_ratio`` caps what a layer loses over ALL steps, relative to its original width.
    ``capture``: "auto" (torch.fx's symbolic trace, torch.export where that fails), "fx" or "export"
    (passes/capture.py). ``counter``: what counts MACs, "thop" (module hooks) or "flops" (torch's FlopCounterMode:
    every dispatched matmul, convolution and attention); default "thop" on an fx graph, "flops" on an exported one.
    ``uniform=True``: every layer of a kind keeps the same width (groups whose members differ only by layer index
    lose the same number of units; passes/uniform.py), as a Hugging Face config needs (obafx.to_hf).
    ``keep_widths``: parameter dims ("name:dim", wildcards allowed, e.g. "*.self_attn.q_proj.weight:0") whose
    coupled groups keep their width: a finer ``ignore`` (which pins every dim of a module, its inputs included).
    obafx.hf_options(model) gives uniform=, keep_widths= and round_to= for a transformers model.
    ``round_to``: kept widths are multiples of it; a group at most ``round_to`` wide prunes freely, or with
    ``keep_narrow=True`` keeps its whole width. On CPU, oneDNN convolutions work in blocks of 16 channels (AVX-512)
    and channels_last BatchNorm is fast at multiples of 8, so a 16-wide layer pruned to 14 costs what 16 did:
    round_to=16, keep_narrow=True trains a half-MAC ResNet-20 1.56-1.68x faster per step in channels_last (three
    runs) where the defaults give 1.31-1.41x (CPU time, 1 thread; in contiguous format both stay at ~1.3-1.5x;
    benchmarks/train_speed.py, benchmarks/kernel_widths.py).
    """
    train, mode, probes = (resolve_train(train, importance), resolve_mode(mode, importance),
                           resolve_probes(probes, importance))
    confidence = resolve_confidence(confidence, importance)
    if structure == "unstructured":
        if latency is not None:
            raise ConfigError("latency= is a budget for structured pruning (zeroed weights do not run faster). "
                              "What to do: drop structure='unstructured', or use sparsity= without latency=.")
        return unstructured(model, example_input, sparsity, importance, data, loss_fn, mode, delta, train,
                            leaf_modules, progress)
    if structure != "structured":
        raise ConfigError(f"structure={structure!r}. What to do: use 'structured' or 'unstructured'.")
    steps, ignore, leaf_modules = check_args(steps, ignore, leaf_modules)
    rank = resolve_rank(rank, importance)
    check_options(normalizer, rank, probes, recalibrate, data, confidence)
    unit_sum = resolve_unit_sum(unit_sum, importance)
    if latency is None and latency_options is not None:
        raise ConfigError("latency_options= is given without latency=. What to do: ask for a latency budget, e.g. "
                          "latency='2x', or drop latency_options=.")
    wanted = check_request(latency, latency_options, example_input) if latency is not None else None
    budget = Budget(macs, channels, max_layer_ratio, round_to, latency=wanted[0] if wanted else None,
                    keep_narrow=keep_narrow)
    criterion(importance)  # an unknown name is a ConfigError before any work
    with S.recording(on_stage) as rec:
        traced = S.trace(model, example_input, leaf_modules, capture)
        counter = counter_name(counter, capture_kind(traced.gm))
        count = thop_macs if counter == "thop" else flop_macs  # read here, not in macs.py: tests count the calls
        # the reference is the user's module (a private copy is timed): a traced GraphModule of the same model
        # runs ~3% slower at batch 1 (MobileNetV2, torch.fx's generated forward), which would inflate every ratio
        timing = LatencyBudget(*wanted, model, traced.inputs) if wanted else None
        facts0 = S.analyze(traced)
        coupling0 = S.couple(facts0, ignore)
        macs = measure_original(traced, count)
        if budget.macs is not None and macs[0] <= 0 and coupling0.groups:  # without groups select says so
            raise BudgetError(f"macs={budget.macs} asks for a fraction of the MACs, and the '{counter}' counter sees "
                              "no compute in this model on the example input. What to do: use counter='flops' "
                              "(torch's FlopCounterMode sees every dispatched matmul and convolution), or a "
                              "channels= budget.")
        source = BatchSource(data, steps, traced.inputs, batches_per_step)
        notes = (source.note,) if source.note and needs_data(importance) else ()
        for note in notes:
            warn_once(note)
        if recalibrate is None:
            recalibrate = data is not None and (has_batchnorm(traced.gm) or bool(norm_widths(traced.gm)))
        run = _Run(budget, steps, macs[0], importance, source, ignore, sum(g.width for g in coupling0.groups),
                   verify, timing, {g.id: g.width for g in coupling0.groups}, rank, bool(recalibrate), count,
                   uniform, tuple([keep_widths] if isinstance(keep_widths, str) else keep_widths))
        current, known, plan, errors = traced, _Known(facts0, coupling0, macs), PrunePlan(), []
        for step in tqdm(range(1, steps + 1), desc="obafx pruning steps", disable=not progress or steps < 2):
            ctx = ScoreContext(None, loss_fn, mode, delta, train, seed + step, progress,
                               normalizer=None if rank == "per_mac" else normalizer, probes=probes,
                               unit_sum=unit_sum, confidence=confidence)
            current, known, step_plan, error, step_notes = _prune_step(run, current, known, step, ctx)
            plan, errors, notes = plan.compose(step_plan), errors + [error], notes + step_notes
        pruned = current.gm
        macs1 = known.macs[0] if known.macs else S.measure(count, pruned, traced.inputs)[0]
        rep = S.report(build_report, traced, pruned, coupling0, plan, run.macs0, macs1, importance, steps,
                       max(errors) if verify and errors else None, list(notes), rec.seconds,
                       scored_with(importance, loss_fn, source)
                       + scoring_settings(importance, mode, train, unit_sum, rank, normalizer, probes, confidence),
                       counter,
                       timing.report() if timing is not None else None)
    attach(pruned, rep)
    return pruned


@dataclass(frozen=True)
class _Run:
    """What every step of one compile_prune call shares: the settings, the original MACs, unit count and group
    widths (id -> width, for the per-layer cap), the ranking rule, whether to recalibrate BatchNorm after each
    step, and the MAC counter."""

    budget: Budget
    steps: int
    macs0: float
    importance: Any
    source: BatchSource
    ignore: Tuple[str, ...]
    units0: int
    verify: bool
    latency: Optional[LatencyBudget] = None
    widths0: Dict[str, int] = field(default_factory=dict)
    rank: str = "score"
    recalibrate: bool = False
    count: Callable = thop_macs  # (module, inputs) -> (total MACs, MACs per layer): thop_macs or flop_macs
    uniform: bool = False  # every layer of a kind keeps the same width
    keep_widths: Tuple[str, ...] = ()  # "name:dim" patterns whose groups selection leaves alone


@dataclass(frozen=True)
class _Known:
    """What is already computed for the module a step starts from, so that no stage runs twice: the first step
    reuses compile_prune's analysis, and every step reuses the MAC count (total, per module) of the rewrite that
    produced its module."""

    facts: Optional[ChannelFacts] = None
    coupling: Optional[Coupling] = None
    macs: Optional[Tuple[float, Dict[str, float]]] = None


def _prune_step(run: _Run, current: Traced, known: _Known, step: int, ctx: ScoreContext):
    """One step: analyse the current module, score, select toward this step's target, rewrite, and check the
    result against the current module with the removed units masked (the masking oracle). Returns the new module,
    what is known of it, this step's plan, the oracle's error and this step's notes (a tuple)."""
    facts = known.facts if known.facts is not None else S.analyze(current)
    coupling = known.coupling if known.coupling is not None else S.couple(facts, run.ignore)
    wants = needs_data(run.importance) or callable(run.importance)  # a callable gets the batches there are
    batches = run.source.for_step() if wants else None
    scores = S.score(run.importance, current.gm, coupling, replace(ctx, batches=batches))
    per_module = None
    if run.budget.channels is None:
        per_module = (known.macs or S.measure(run.count, current.gm, current.inputs))[1]
    if run.rank == "per_mac":
        scores = S.rank(scores, unit_costs(current.gm, coupling, per_module))
    now = sum(g.width for g in coupling.groups)  # units before uniform bundles them (a channels= budget's count)
    if run.keep_widths:
        coupling = without_kept(coupling, run.keep_widths)
    if run.uniform:
        coupling, scores = uniform_coupling(coupling, scores)

    def rewritten(removed):
        return S.rewrite(current, coupling, facts.shapes, removed)

    notes, macs = (), None
    if run.budget.channels is not None:
        removed = select_channels(coupling, scores, run.budget, step, run.steps, run.units0, run.widths0, now)
        gm = rewritten(removed)
    elif run.latency is not None:
        removed, gm, notes = fit_latency(run.latency, run.budget, run.widths0, run.steps, current, facts, coupling,
                                         scores, step, rewritten)
    else:
        target = run.macs0 * run.budget.macs ** (step / run.steps)
        measured = {}  # module -> (total, per module): the next step's MAC model reuses it

        def measure(gm):
            measured[gm] = S.measure(run.count, gm, current.inputs)
            return measured[gm][0]

        removed, gm, notes = fit(coupling, scores, run.budget, target, MacModel(coupling, per_module).estimate,
                                 rewritten, measure, widths0=run.widths0, last=step == run.steps)
        macs = measured[gm]
    plan = plan_from_removed(coupling, removed)
    error = S.verify(current, coupling, removed, plan, gm) if run.verify else None
    if run.recalibrate:  # after the oracle: it compares against the current module's statistics
        batches = batches if batches is not None else run.source.for_step()
        # distributed_importance brings its own: every rank fits / re-estimates on the union of the shards
        gm = S.renormalize(gm, norm_widths(current.gm), batches, getattr(run.importance, "summed_across", None))
        gm = S.recalibrate(getattr(run.importance, "recalibrated", recalibrated), gm, batches)
    return Traced(gm, current.inputs), _Known(macs=macs), plan, error, notes
