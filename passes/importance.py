"""Importance: per-parameter scores in, one normalised score per prunable unit out (OBA.md section 3).

Per coupled group and member (a layer's output side, weight rows + bias, or its input side, weight columns):
sum each unit's slice of the parameter scores, take the absolute value, average over the members that carry
any score, then divide by the group's maximum so that all groups rank together under one threshold
(``normalizer="max"``; "mean" and "sum" divide by the group's mean / sum of |score|).

``normalizer=None`` gives raw scores meant to be compared across groups (and divided by a unit's MACs for
rank="per_mac"), so they are the unit's TOTAL: |Σ over all its slices|, not the mean over members (a member
mean would make a unit with many members, e.g. a residual-stream channel read by many layers, look several
times cheaper than it is). For the data-driven criteria that total is in the loss's units: for Taylor it is the
first-order loss change of removing the unit, |g_uᵀθ_u|; for OBA |θ_uᵀ(Mθ)|; OBD and Fisher sum
½θ²·curvature. The group-exact "oba_group" score is a loss change per unit by construction. Magnitude scores are
weight norms. ``unit_sum="abs"`` sums |s_i| instead of s_i: an upper bound of that loss change that does not
cancel, so it does not swing with the calibration images (benchmarks/score_noise.py). ``unit_sum="member"`` sits
between the two: each member's slice is summed with its signs (a layer's rows with its bias, a layer's columns,
a norm's weight), and the members' magnitudes are added. In a plain chain each member alone silences the unit
(zeroing a conv's rows, or the next layer's columns), so its signed sum is a first-order estimate of that
removal's loss change; adding magnitudes lets those estimates reinforce instead of cancel, while nothing inside a
slice is taken apart. This is OBA.md section 3's per-member rule, summed instead of averaged so that groups
compare. Under a normaliser every rule but "abs" is the member mean of |member sum|, as the paper writes it.
Measured (README, "The method, in short"): at equal widths "member" keeps far better VGG-BN channels than "abs"
(benchmarks/fixed_widths.py). Scored in eval mode it wins VGG-BN's pruning runs but loses ResNet-20's badly;
scored in train mode (OBA's default) it keeps VGG-BN and recovers most of that loss, while "abs" stays ahead on the
small ViT (no BatchNorm there). No rule wins every model (README, Known limits).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, ScoreError
from .facts import DEFAULT_MODE, Coupling, ScoreContext  # noqa: F401 (DEFAULT_MODE re-exported)

NORMALIZERS = ("max", "mean", "sum", None)
UNIT_SUMS = ("signed", "abs", "member")


def _slot_vector(score: torch.Tensor, dim: int) -> np.ndarray:
    """Sum of ``score`` over every dim but ``dim`` (a row sum for dim 0, a column sum for dim 1)."""
    others = [d for d in range(score.dim()) if d != dim]
    vec = score.sum(dim=others) if others else score
    return vec.detach().double().cpu().numpy()


def member_vectors(coupling: Coupling, param_scores: Dict[str, torch.Tensor]) -> Dict[int, Dict[tuple, np.ndarray]]:
    """Group index -> member -> per-unit summed score. A member is (owner, role) for layer slots (so a bias
    joins its weight's rows) and (parameter name, dim) for free parameters and norms."""
    n = max((max(g.units) for g in coupling.groups), default=-1) + 1
    group_of = np.full(n + 1, -1, dtype=np.int64)
    local = np.full(n + 1, -1, dtype=np.int64)
    for gi, g in enumerate(coupling.groups):
        group_of[list(g.units)] = gi
        local[list(g.units)] = np.arange(g.width)
    out: Dict[int, Dict[tuple, np.ndarray]] = {}
    for key, units in coupling.slot_units.items():
        name, dim = key
        if name not in param_scores:
            continue
        vec = _slot_vector(param_scores[name], dim)
        units = np.minimum(units, n)
        gis = group_of[units]
        role, owner = coupling.slot_roles[key]
        member = (owner, role) if role in ("out", "in") else key
        for gi in np.unique(gis[gis >= 0]):
            sel = gis == gi
            acc = out.setdefault(int(gi), {}).setdefault(member, np.zeros(coupling.groups[gi].width))
            np.add.at(acc, local[units[sel]], vec[sel])
    return out


def normalized(values: np.ndarray, normalizer: Optional[str]) -> np.ndarray:
    """One group's unit scores divided by the group's max / mean / sum of |score| (None: unchanged). Scores may
    be signed (oba_group); dividing by a positive scale keeps their order. An all-zero group stays zero."""
    if normalizer is None or not values.size:
        return values
    size = np.abs(values)
    scale = {"max": size.max, "mean": size.mean, "sum": size.sum}[normalizer]()
    return values / scale if scale > 0 else values


def normalize_units(coupling: Coupling, scores: Dict[int, float], normalizer: Optional[str]) -> Dict[int, float]:
    """Unit -> score, each group's scores passed through `normalized`."""
    out = dict(scores)
    for g in coupling.groups:
        vals = normalized(np.array([scores.get(u, 0.0) for u in g.units], dtype=np.float64), normalizer)
        out.update(zip(g.units, vals.tolist()))
    return out


def aggregate(coupling: Coupling, param_scores: Dict[str, torch.Tensor], reduce: str = "oba",
              normalizer: Optional[str] = "max", unit_sum: str = "signed") -> Dict[int, float]:
    """Unit -> score, normalised within its group by ``normalizer`` (see `normalized`; default: the group's
    maximum). ``reduce``: "oba" (mean over scored members of |sum|; with normalizer=None the raw total
    |Σ over members|, or Σ over members of |sum| for unit_sum="member", see the module docstring) or "l2" (square
    root of the sum over members; for squared magnitudes). ``param_scores`` are `summands` already."""
    vectors = member_vectors(coupling, param_scores)
    scores: Dict[int, float] = {}
    for gi, g in enumerate(coupling.groups):
        members = list(vectors.get(gi, {}).values())
        if reduce == "l2":
            s = np.sqrt(np.maximum(sum(members), 0.0)) if members else np.zeros(g.width)
        elif normalizer is None and unit_sum == "member":
            s = sum(np.abs(v) for v in members) if members else np.zeros(g.width)
        elif normalizer is None:
            s = np.abs(sum(members)) if members else np.zeros(g.width)
        else:
            scored = [np.abs(v) for v in members if np.any(v != 0)]
            s = np.mean(scored, axis=0) if scored else np.zeros(g.width)
        if not np.all(np.isfinite(s)):
            raise ScoreError(f"group '{g.id}' has NaN/inf scores. What to do: check the calibration data and loss "
                             "(finite inputs, labels in range), or score in float64.")
        s = normalized(s, normalizer)
        scores.update({u: float(v) for u, v in zip(g.units, s)})
    return scores


def _magnitude(model: nn.Module, coupling: Coupling, ctx: ScoreContext) -> Dict[int, float]:
    squares = {name: p.detach() ** 2 for name, p in model.named_parameters()}
    return aggregate(coupling, squares, reduce="l2", normalizer=ctx.normalizer)


def _random(model: nn.Module, coupling: Coupling, ctx: ScoreContext) -> Dict[int, float]:
    rng = np.random.default_rng(ctx.seed)
    units = [u for g in coupling.groups for u in g.units]
    return dict(zip(units, rng.random(len(units)).tolist()))


def _needs_batches(ctx: ScoreContext, name: str):
    if ctx.batches is None:
        raise ConfigError(f"importance='{name}' needs calibration data. What to do: pass data=<iterable of batches>.")
    return ctx.batches


def _oba_parameters(model, batches, ctx: ScoreContext, **kw):
    from .hvp import parameter_scores
    return parameter_scores(model, batches, loss_fn=ctx.loss_fn, mode=ctx.mode, delta=ctx.delta, train=ctx.train,
                            chunk_size=ctx.chunk_size, progress=ctx.progress, **kw)


def _baseline_parameters(name: str):
    """The per-parameter scores of a criterion from criteria.py, with the same data and options as OBA."""

    def scores(model, batches, ctx: ScoreContext, **kw):
        from . import criteria

        if name == "obd":
            kw.setdefault("seed", ctx.seed)
        return getattr(criteria, f"{name}_scores")(model, batches, loss_fn=ctx.loss_fn, train=ctx.train,
                                                   chunk_size=ctx.chunk_size, progress=ctx.progress, **kw)

    scores.__name__ = f"{name}_parameter_scores"
    return scores


def summands(param_scores: Dict[str, torch.Tensor], unit_sum: str) -> Dict[str, torch.Tensor]:
    """What `aggregate` adds up per unit: the scores as they are ("signed": |Σ s_i| over the unit, its loss change;
    "member": the same summands, whose member sums `aggregate` adds by magnitude) or their magnitudes ("abs":
    Σ |s_i|, as Torch-Pruning's Taylor; nothing cancels inside a unit)."""
    return {k: v.abs() for k, v in param_scores.items()} if unit_sum == "abs" else param_scores


def _from_parameters(name: str, parameters: Callable):
    """Unit scores of a per-parameter criterion: its scores on ``ctx.batches``, aggregated per group."""

    def score(model, coupling, ctx):
        return aggregate(coupling, summands(parameters(model, _needs_batches(ctx, name), ctx), ctx.unit_sum),
                         normalizer=ctx.normalizer, unit_sum=ctx.unit_sum)

    score.__name__ = name
    return score


def _oba_group(model, coupling, ctx):
    """The group-exact loss change of removing each unit (group_scores.py), signed, then normalised per group."""
    from .group_scores import group_scores
    raw = group_scores(model, coupling, _needs_batches(ctx, "oba_group"), loss_fn=ctx.loss_fn, mode=ctx.mode,
                       train=ctx.train, probes=ctx.probes, seed=ctx.seed, chunk_size=ctx.chunk_size,
                       progress=ctx.progress, confidence=ctx.confidence)
    return normalize_units(coupling, raw, ctx.normalizer)


@dataclass(frozen=True)
class Criterion:
    """One importance criterion: ``units(model, coupling, ctx) -> {unit: score}``; ``parameters(model, batches,
    ctx, **kw) -> {name: tensor}`` its per-parameter scores (None: it has none, e.g. magnitude's are not
    data-driven, oba_group's are per unit); ``needs_data``: scored on calibration batches; ``default_rank`` and
    ``default_unit_sum``: the ranking and the unit sum compile_prune uses when the caller gives none (see
    ``resolve_rank``, ``resolve_unit_sum``); ``default_train``: whether it scores in train mode when the caller
    does not say (``resolve_train``); ``default_mode`` and ``default_probes``: the Hessian ("full" H or "residual"
    H - G) and the Rademacher probes per batch (``resolve_mode``, ``resolve_probes``); ``default_confidence``: the
    standard errors oba_group adds to each unit's mean (``resolve_confidence``)."""

    name: str
    units: Callable[[nn.Module, Coupling, ScoreContext], Dict[int, float]]
    parameters: Optional[Callable[..., Dict[str, torch.Tensor]]] = None
    needs_data: bool = False
    default_rank: str = "score"
    default_unit_sum: str = "signed"
    default_train: bool = False
    default_mode: str = DEFAULT_MODE
    default_probes: int = 1
    default_confidence: float = 0.0


def _data_criterion(name: str, parameters: Callable) -> Criterion:
    return Criterion(name, _from_parameters(name, parameters), parameters, True)


# THE criteria registry: compile_prune, obafx.distributed and the Torch-Pruning adapter all read this one.
REGISTRY: Dict[str, Criterion] = {c.name: c for c in (
    Criterion("magnitude", _magnitude),
    Criterion("random", _random),
    # OBA's defaults are the configuration the accuracy benchmark supports (README, accuracy section): scored in
    # train mode (BatchNorm on each batch's own statistics, as the paper's code scores), each member's signed slice
    # sum taken by magnitude and added per unit (OBA.md section 3's rule), ranked per MAC saved.
    replace(_data_criterion("oba", _oba_parameters), default_rank="per_mac", default_unit_sum="member",
            default_train=True),
    # The group-exact score's defaults are the configuration benchmarks/score_truth.py and the accuracy benchmark
    # support: the full Hessian in train mode is the estimate closest to the true loss change of removing a unit
    # (rank correlation 0.53 on ResNet-20, against 0.20-0.27 for OBA's and Taylor's sums; 0.28 with 1 probe
    # instead of 4), and per-MAC ranking compares the estimates, which are in loss units, across groups. Ranked by
    # an upper confidence bound (mean + 2 standard errors): with the plain mean, noisy draws below zero sent the
    # most interacting units first, and with one standard error the ViT's residual-stream channels still went
    # early on luck (a unit that looks free on the step's images and costs on others; accuracy benchmark: README).
    replace(Criterion("oba_group", _oba_group, None, True), default_rank="per_mac", default_train=True,
            default_mode="full", default_probes=4, default_confidence=2.0),
    *(_data_criterion(name, _baseline_parameters(name)) for name in ("taylor", "obd", "fisher")),
)}
CRITERIA = {name: c.units for name, c in REGISTRY.items()}  # name -> unit scorer (the older view of REGISTRY)


def parameter_criteria() -> tuple:
    """Names of the registered criteria with per-parameter scores (what distributed scoring can all-reduce)."""
    return tuple(name for name, c in REGISTRY.items() if c.parameters is not None)


PARAMETER_CRITERIA = parameter_criteria()  # at import (the registry's built-in ones)


def criterion(importance: Any) -> Optional[Criterion]:
    """The registry entry of ``importance`` (None for a callable); ConfigError naming the choices otherwise."""
    if callable(importance):
        return None
    if importance not in REGISTRY:
        raise ConfigError(f"importance={importance!r} is unknown. What to do: use one of {sorted(REGISTRY)} or a "
                          "callable (model, coupling, ctx) -> {unit: score}.")
    return REGISTRY[importance]


# What a callable importance may carry to act like a registry entry (obafx.distributed's callables copy all of them).
CALLABLE_DEFAULTS = ("needs_data", "default_rank", "default_unit_sum", "default_train", "default_mode",
                     "default_probes", "default_confidence")


def _default(importance: Any, field: str, fallback: Any) -> Any:
    """The registry entry's ``field`` for a named criterion; for a callable its attribute of that name, if any."""
    entry = criterion(importance)
    return getattr(entry, field) if entry is not None else getattr(importance, field, fallback)


def resolve_rank(rank: Optional[str], importance: Any) -> str:
    """The ranking rule: ``rank`` when given, else the criterion's default ("per_mac" for "oba", "score" for the
    other criteria, and for callables unless they carry a ``default_rank`` attribute, as obafx.distributed's do)."""
    return rank if rank is not None else _default(importance, "default_rank", "score")


def resolve_unit_sum(unit_sum: Optional[str], importance: Any) -> str:
    """How unit scores add up: ``unit_sum`` when given, else the criterion's default ("member" for "oba", "signed"
    for the others, and for callables unless they carry a ``default_unit_sum`` attribute). ConfigError for a
    value that is not in UNIT_SUMS, or "abs" for a criterion without per-parameter scores (a callable reads
    ctx.unit_sum itself if it cares)."""
    if unit_sum is None:
        return _default(importance, "default_unit_sum", "signed")
    entry = criterion(importance)
    if unit_sum not in UNIT_SUMS:
        raise ConfigError(f"unit_sum={unit_sum!r}. What to do: use one of {UNIT_SUMS}.")
    if unit_sum != "signed" and entry is not None and entry.parameters is None:
        raise ConfigError(f"unit_sum={unit_sum!r} sums per-parameter scores, and importance={importance!r} has none. "
                          "What to do: use it with 'oba', 'taylor', 'obd' or 'fisher', or leave unit_sum='signed'.")
    return unit_sum


def resolve_mode(mode: Optional[str], importance: Any) -> str:
    """OBA's Hessian: ``mode`` when given, else the criterion's default ("residual" H - G for "oba", the paper's
    criterion; "full" H for "oba_group", whose score is the loss change itself)."""
    return mode if mode is not None else _default(importance, "default_mode", DEFAULT_MODE)


def resolve_probes(probes: Optional[int], importance: Any) -> int:
    """Rademacher probes per batch: ``probes`` when given, else the criterion's default (4 for "oba_group", 1
    otherwise)."""
    return probes if probes is not None else _default(importance, "default_probes", 1)


def resolve_confidence(confidence: Optional[float], importance: Any) -> float:
    """Standard errors oba_group adds to each unit's mean loss change: ``confidence`` when given, else the
    criterion's default (1.0 for "oba_group", 0 otherwise: the other criteria do not read it)."""
    return confidence if confidence is not None else _default(importance, "default_confidence", 0.0)


def resolve_train(train: Optional[bool], importance: Any) -> bool:
    """Whether to score in train mode: ``train`` when given, else the criterion's default (True for "oba" and
    "oba_group": BatchNorm on each batch's own statistics; False for the others, and for callables unless they
    carry a ``default_train`` attribute)."""
    return bool(train if train is not None else _default(importance, "default_train", False))


def needs_data(importance: Any) -> bool:
    """Whether ``importance`` scores on calibration batches (a callable says so with a ``needs_data``
    attribute, as obafx.distributed's do; compile_prune hands a callable the batches whenever there are any)."""
    return bool(_default(importance, "needs_data", False))


def _checked(scores: Any, coupling: Coupling, name: str) -> Dict[int, float]:
    """A user criterion's result must be {unit: finite float} covering the prunable units."""
    if not isinstance(scores, dict):
        raise ScoreError(f"importance '{name}' returned {type(scores).__name__}, not a dict. What to do: return "
                         "{unit id: score} for the units in coupling.groups[i].units.")
    bad = [u for u, v in scores.items() if not np.isfinite(float(v))]
    if bad:
        raise ScoreError(f"importance '{name}' gave NaN/inf scores for {len(bad)} units (e.g. unit {bad[0]}). "
                         "What to do: check the criterion and its data.")
    return scores


def unit_scores(importance: Any, model: nn.Module, coupling: Coupling, ctx: ScoreContext) -> Dict[int, float]:
    """Scores of every prunable unit. ``importance``: a name in REGISTRY, or a callable
    ``(model, coupling, ctx) -> {unit: score}`` (the seam for user criteria)."""
    entry = criterion(importance)
    if entry is None:
        return _checked(importance(model, coupling, ctx), coupling, getattr(importance, "__name__", "custom"))
    return entry.units(model, coupling, ctx)
