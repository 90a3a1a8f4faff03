"""The group-exact second-order score (importance="oba_group", OBA.md section 7): the loss change of removing
each prunable unit on its own, for all units at once, at the cost of one HVP per probe and batch.

Removing unit u zeroes θ_u, EVERY parameter slice the unit owns (a conv's output rows and bias, the next
layers' input columns, a norm's weight and bias: the members of its coupled group). To second order

    ΔL_u ≈ −g_uᵀθ_u + ½ θ_uᵀ M_uu θ_u,     M = H (mode="full") or H − G (mode="residual"),

with g the loss gradient. The diagonal blocks come from Rademacher signs, one per unit: v = Σ_w s_w θ_(w)
(θ_(w): θ restricted to w's slices, zero elsewhere; a weight in two units, row of one and column of another,
gets both signs), one HVP gives Mv, and s_u θ_(u)ᵀ(Mv) = θ_uᵀM_uuθ_u + Σ_{w≠u} s_u s_w θ_(u)ᵀMθ_(w) has
expectation θ_uᵀM_uuθ_u (E[s_u s_w] = 0). The mean over ``probes`` sign draws per batch and over batches is the
estimate; with all 2^n sign patterns it is exact.

What it adds over OBA's θ ⊙ (Mθ) summed over a group's slices: that sum is θ_(u)ᵀ(Mθ), the unit's interaction
with every parameter, as if all were removed at once. It counts the cross terms between u and the other units of
its own group and of every other group, which do not change when u alone goes; ΔL_u keeps only u's own block.
The first-order term −g_uᵀθ_u is included: it is part of the loss change (near a minimum it is small, but after a
few pruning steps the model is far from one).

The score is ΔL_u itself, signed (a loss increase; lower is removed first), not |ΔL_u|: a unit whose removal
lowers the estimated loss (ΔL_u < 0) is the cheapest one to remove, and |ΔL_u| would rank it among the most
important and keep it. Normalisers divide by a positive per-group scale (max |ΔL|), which keeps that order.

``confidence`` = z ranks by an upper confidence bound instead, mean + z · (standard error of the mean over the
batch x probe samples): a unit is removed early only when its loss change is low with confidence. Why: the
cross terms a probe picks up, Σ_{w≠u} s_u s_w θ_(u)ᵀMθ_(w), make a unit's estimate noisier the more it
interacts, and the most interacting units are the ones that matter most (a residual stream's channels, read by
every block). With the plain mean, a noisy draw below zero makes such a unit look like the cheapest of all; the
bound keeps it until the samples agree that it is cheap (benchmarks/accuracy.py: README).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .errors import ConfigError, ScoreError
from .facts import DEFAULT_MODE, Coupling
from .hvp_kernels import grad_and_hvp
from .scoring import check_batch, chunked, progress_bar, scoring, split_batch

__all__ = ["check_confidence", "group_scores", "unit_order"]


def unit_order(coupling: Coupling) -> List[int]:
    """The prunable units in the order of a sign vector's entries: group by group, each group's own order."""
    return [u for g in coupling.groups for u in g.units]


class _UnitIndex:
    """For each scored parameter, the units each of its entries belongs to: ``ids[name]`` is (k, numel), k the
    parameter's slot dims, holding the unit's position in `unit_order` (or n: no prunable unit, or the same unit
    already listed for the entry, so that an entry counts once per unit)."""

    def __init__(self, coupling: Coupling, params: Dict[str, Tensor]):
        self.units = unit_order(coupling)
        self.n = n = len(self.units)
        top = max([n] + [int(a.max()) + 1 for a in coupling.slot_units.values() if a.size])
        pos = np.full(top, n, dtype=np.int64)
        pos[self.units] = np.arange(n)
        self.ids: Dict[str, Tensor] = {}
        slots: Dict[str, list] = {}
        for (slot, dim), units in coupling.slot_units.items():
            slots.setdefault(slot, []).append((dim, units))
        for name, p in params.items():
            rows = []
            for dim, units in slots.get(name, ()):
                shape = [1] * p.dim()
                shape[dim] = p.shape[dim]
                local = torch.as_tensor(pos[units], device=p.device).reshape(shape)
                rows.append(local.expand(p.shape).reshape(-1))
            if not rows:
                continue
            ids = torch.stack(rows)
            if len(rows) > 1:
                ids = ids.sort(dim=0).values
                ids[1:][ids[1:] == ids[:-1]] = n  # a unit on two dims of one entry (a square coupled weight)
            if bool((ids < n).any()):
                self.ids[name] = ids

    def vector(self, signs: Tensor, theta: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """v = Σ_u s_u θ_(u) on every scored parameter."""
        out = {}
        for name, t in theta.items():
            ext = torch.cat([signs, signs.new_zeros(1)]).to(t.device, t.dtype)
            coef = ext[self.ids[name][0]]
            for row in self.ids[name][1:]:  # row by row: no (k, numel) temporary
                coef += ext[row]
            out[name] = t * coef.reshape(t.shape)
        return out

    def per_unit(self, values: Dict[str, Tensor]) -> Tensor:
        """Per unit (float64, CPU), the sum of ``values`` over the unit's entries (summed on their device)."""
        out = None
        for name, ids in self.ids.items():
            v = values[name].detach().reshape(-1).double()
            out = torch.zeros(self.n + 1, dtype=torch.float64, device=v.device) if out is None else out
            for row in ids:
                out.index_add_(0, row, v)
        return out[:self.n].cpu()


def _rademacher(n: int, probes: int, generator: torch.Generator) -> Tensor:
    return (torch.randint(0, 2, (probes, n), generator=generator) * 2 - 1).double()


def group_scores(model: nn.Module, coupling: Coupling, batches: Iterable, loss_fn: Optional[Callable] = None,
                 mode: str = DEFAULT_MODE, train: bool = False, probes: int = 1, seed: int = 0,
                 chunk_size: Optional[int] = None, progress: bool = False,
                 signs: Optional[Tensor] = None, confidence: float = 0.0) -> Dict[int, float]:
    """Unit -> ΔL_u = −g_uᵀθ_u + ½ θ_uᵀM_uuθ_u (see the module docstring), the mean over ``batches``.

    In: ``model`` (never modified), its ``coupling`` (the units and the parameter slices each removes),
    ``batches`` / ``loss_fn`` / ``train`` / ``chunk_size`` / ``progress`` as in ``parameter_scores``; ``mode``
    "full" (M = H) or "residual" (M = H − G); ``probes`` Rademacher sign vectors per batch (one HVP each),
    drawn from a CPU generator seeded with ``seed``. ``signs``: a (P, n) tensor of ±1 rows used for every
    batch instead of random draws (n = len(unit_order(coupling)); all 2^n rows give the exact quadratic forms).
    ``confidence`` = z: each unit's score is the mean plus z standard errors of the mean over the (batch, probe)
    samples (0: the mean; with a single sample there is no spread to add).
    Out: {unit: float}, signed; the first-order term uses the gradient of the first probe's pass.
    """
    if mode not in ("full", "residual"):
        raise ConfigError(f"mode={mode!r}. What to do: use mode='full' (loss Hessian) or 'residual' (H - G)")
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ConfigError(f"probes={probes!r}. What to do: pass a positive integer")
    check_confidence(confidence)
    params = dict(model.named_parameters())
    names = [n for n in params if any(slot == n for slot, _ in coupling.slot_units)]
    index = _UnitIndex(coupling, {n: params[n] for n in names})
    if not index.n or not index.ids:
        return {u: 0.0 for u in index.units}
    generator = torch.Generator().manual_seed(seed)
    moments = _Moments(index.n)
    with scoring(model, list(index.ids), loss_fn, train, chunk_size) as setup:
        for batch in progress_bar(batches, progress, f"OBA group-exact ({mode}) scores"):
            args, targets = split_batch(batch)
            check_batch(setup, args, targets)
            rows = signs.double() if signs is not None else _rademacher(index.n, probes, generator)
            moments.add(_batch_delta(setup, index, args, targets, rows, mode, chunk_size))
    if not moments.samples:
        raise ScoreError("batches was empty. What to do: pass at least one (inputs, targets) batch")
    delta = moments.bound(confidence).numpy()
    if not np.all(np.isfinite(delta)):
        raise ScoreError("the group-exact scores contain NaN or inf. What to do: check the inputs and loss for "
                         "NaN/inf and the weights for overflow; score in float64")
    return dict(zip(index.units, delta.tolist()))


def check_confidence(confidence) -> None:
    """ConfigError unless ``confidence`` is a finite number >= 0 (standard errors added to a unit's mean)."""
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 <= confidence < float("inf"):
        raise ConfigError(f"confidence={confidence!r}. What to do: pass a number >= 0 (standard errors added to "
                          "each unit's mean loss change; 0 = the mean)")


class _Moments:
    """Running per-unit sums of the (batch, probe) samples and of their squares: the mean and its standard error.
    Every batch has the same number of probes, so the mean over samples is the mean over batches."""

    def __init__(self, n: int):
        self.sum = torch.zeros(n, dtype=torch.float64)
        self.squares = torch.zeros(n, dtype=torch.float64)
        self.samples = 0

    def add(self, rows: Tensor) -> None:
        self.sum += rows.sum(0)
        self.squares += (rows ** 2).sum(0)
        self.samples += rows.shape[0]

    def bound(self, z: float) -> Tensor:
        mean = self.sum / self.samples
        if not z or self.samples < 2:
            return mean
        variance = (self.squares / self.samples - mean ** 2).clamp_min(0) * self.samples / (self.samples - 1)
        return mean + z * (variance / self.samples).sqrt()


def _batch_delta(setup, index: _UnitIndex, args, targets, rows: Tensor, mode: str, chunk_size) -> Tensor:
    """ΔL per unit on one batch, one sample per sign row: (rows, n) of −g_uᵀθ_u + ½ s_u θ_(u)ᵀ(M v(s))."""
    first, quads = None, []
    for row in rows:
        v = index.vector(row.to(setup.dtype), setup.theta)
        g, mv = chunked(setup, args, targets, chunk_size, lambda a, t: grad_and_hvp(setup, a, t, v, mode))
        if first is None:
            first = index.per_unit({n: th * g[n] for n, th in setup.theta.items()})
        quads.append(row * index.per_unit({n: th * mv[n] for n, th in setup.theta.items()}))
    return -first + 0.5 * torch.stack(quads)
