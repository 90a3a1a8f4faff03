"""Fit a budget: correct a selection until a measured cost lands within a tolerance of its target, on both sides.

Selection ranks units with a fast per-layer estimate; the real cost (thop MACs today, torch's flop counter or a
latency timer tomorrow) of the rewritten module can differ from it, above or below. ``fit_budget`` treats the
estimate's aim as the knob: it re-selects with a corrected aim, keeps a bracket (an aim known to land too high,
one known to land too low) and bisects inside it once the proportional correction would leave it. An aim the
selection cannot reach (BudgetError) is a floor: when the estimate underrates what the kept channels cost, the
correction can jump below every reachable selection, and the loop then bisects between that floor and the lowest
aim that landed above, down to the cheapest selection the caps allow. It stops when a candidate lands within the
tolerance, or when no other selection is reachable; then it returns the closest candidate that does not exceed
the target by more than the tolerance, with a note saying why it is not closer.

A noisy cost (a latency timed on a busy machine) gets a second look: with ``confirm``, a candidate that lands
within the tolerance is measured again (pooled with its first measurement) before it is accepted. Without it,
the loop keeps whichever of several candidates happened to draw a measurement inside the band, and a later,
independent measurement of that candidate lands outside it more often than not (the winner's curse). A near
miss (within twice the tolerance) gets the same second look: one draw pushes a candidate out of the band as
easily as into it, and a candidate rejected on such a draw sends the loop to a farther selection.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, FrozenSet, Optional, Set

from .errors import BudgetError

TOLERANCE = 0.02  # a budget is met when the measured cost is within 2% of its target, above or below
MISSED = "budget was missed"  # every note about a missed budget contains this (tests and benchmarks look for it)


@dataclass(frozen=True)
class Fitted:
    """The chosen candidate: removed units, the rewritten module, its measured cost, and a note when the cost is
    outside the tolerance (None when the budget is met)."""

    removed: FrozenSet[int]
    module: Any
    cost: float
    note: Optional[str] = None


def fit_budget(target: float, select_at: Callable[[float], Set[int]], build: Callable[[Set[int]], Any],
               measure: Callable[[Any], float], *, tolerance: float = TOLERANCE, rounds: int = 12,
               what: str = "MAC", confirm: Optional[Callable[[Any], float]] = None) -> Fitted:
    """Find removed units whose built module's measured cost is within ``tolerance`` (relative) of ``target``.

    ``select_at(aim) -> removed units`` selects toward an aim of the estimate (monotone: a lower aim removes at
    least as much); ``build(removed) -> module``; ``measure(module) -> cost``. ``what`` names the cost in notes.
    ``confirm(module) -> cost``: a second, pooled measurement of a candidate that landed within the tolerance,
    taken once per candidate before it is accepted (None: costs are exact, as thop's are).
    A BudgetError from the first selection propagates (the target is out of reach); a later one ends the search.
    """
    seen: Dict[FrozenSet[int], Fitted] = {}
    confirmed: Set[FrozenSet[int]] = set()
    aim, low, high = target, None, None  # low: an aim that landed below the band; high: one that landed above
    floor = None  # the highest aim the selection could not reach (its estimate cannot go that low)
    for _ in range(rounds):
        try:
            removed = frozenset(select_at(aim))
        except BudgetError:
            if not seen:
                raise
            # The correction overshot what the estimate can reach (it underrates what the kept channels cost):
            # the cheapest reachable selection lies between this aim and the lowest aim that landed above.
            floor = aim
            if high is None or _collapsed(floor, high):
                break
            aim = (floor + high) / 2
            continue
        if removed not in seen:
            module = build(set(removed))
            seen[removed] = Fitted(removed, module, float(measure(module)))
        if confirm is not None and _within(seen[removed].cost, target, 2 * tolerance) and removed not in confirmed:
            confirmed.add(removed)
            seen[removed] = replace(seen[removed], cost=float(confirm(seen[removed].module)))
        cost = seen[removed].cost
        if _within(cost, target, tolerance):
            return seen[removed]
        if cost < target and not removed:  # already below before removing anything: an earlier step overshot
            return _closest(seen.values(), target, tolerance, what, "the module this step starts from already "
                            "costs less (an earlier step removed a coarse group)")
        if cost > target:
            high = aim if high is None else min(high, aim)
        else:
            low = aim if low is None else max(low, aim)
        nxt = aim * target / cost if cost > 0 else aim * 2
        lower = low if low is not None else floor  # the bracket's lower end: landed below, else unreachable
        if lower is not None and high is not None:
            if _collapsed(lower, high):
                break
            if not lower < nxt < high:
                nxt = (lower + high) / 2
        aim = nxt
    # A new candidate in every round means the search was still moving when the rounds ran out; otherwise the
    # bracket closed between two selections (or rounds went to re-selecting ones already built): steps that coarse.
    ran_out = len(seen) >= rounds
    return _closest(seen.values(), target, tolerance, what,
                    f"the {rounds} candidates allowed (rounds=; a latency budget's LatencyOptions(candidates=)) ran "
                    "out before one landed in the band" if ran_out else None)


def _within(cost: float, target: float, tolerance: float) -> bool:
    return abs(cost - target) <= tolerance * target


def _collapsed(lower: float, upper: float) -> bool:
    """Whether a bracket of aims has shrunk to nothing (relative to its upper end)."""
    return upper - lower <= 1e-9 * max(abs(upper), 1.0)


def _closest(candidates, target: float, tolerance: float, what: str, why: Optional[str] = None) -> Fitted:
    """The candidate nearest the target among those not above it by more than the tolerance (else the cheapest),
    with a note naming the nearest costs reached on each side."""
    candidates = list(candidates)
    feasible = [c for c in candidates if c.cost <= target * (1 + tolerance)]
    best = max(feasible, key=lambda c: c.cost) if feasible else min(candidates, key=lambda c: c.cost)
    above = [c.cost for c in candidates if c.cost > target * (1 + tolerance)]
    below = [c.cost for c in candidates if c.cost < target * (1 - tolerance)]
    sides = []
    if below:
        sides.append(f"{max(below) / target:.3f}x")
    if above:
        sides.append(f"{min(above) / target:.3f}x")
    if why is None and below and above:
        why = ("the nearest selections land at " + " and ".join(sides) + " of it: removing one more channel group "
               "moves the cost by more than the tolerance")
    elif why is None:
        why = ("no selection lowered the cost further (per-layer caps, rounding or ignore= stop it)" if above else
               "every selection the estimate reaches costs less (the estimate overrates what the kept channels cost)")
    note = (f"the {what} budget was missed: the result keeps {best.cost / target:.3f}x its {what} target "
            f"(tolerance ±{tolerance:.0%}); {why}")
    return Fitted(best.removed, best.module, best.cost, note)
