"""Select: unit scores and a budget in, the set of units to remove out.

Units of all groups are ranked together by score (normalised per group by the importance stage, or raw per MAC
saved with rank="per_mac").
Each group keeps at least one unit and loses at most ``max_layer_ratio`` of its ORIGINAL width over all steps
(``widths0``: the group widths before the first step; the cap does not compound); kept widths are rounded up
to a multiple of ``round_to`` (a group at most ``round_to`` wide prunes freely, or with ``keep_narrow`` keeps its
whole width: a narrower one would pad back to ``round_to`` in blocked kernels). A MAC budget is met by bisection
on the ranked list with a per-layer MAC model, then checked with thop by the caller. With a latency cost model's
kernel blocks, groups that have none are fitted again around the blocked groups' whole-block removal, so that a
block's jump does not decide how close the selection lands.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Set

from .errors import BudgetError
from .facts import Budget, Coupling


def _caps(coupling: Coupling, budget: Budget, widths0: Optional[Dict[str, int]] = None) -> Dict[str, int]:
    """How many units each group may lose at most in this step: ``max_layer_ratio`` of its original width
    (``widths0[id]``; the current width for a group not in ``widths0``) less what earlier steps removed."""
    widths0 = widths0 or {}
    caps = {}
    for g in coupling.groups:
        w0 = max(widths0.get(g.id, g.width), g.width)
        allowed = int(math.floor(budget.max_layer_ratio * w0)) - (w0 - g.width)
        caps[g.id] = max(0, min(g.width - 1, allowed))
    return caps


def _take(ranked: List[int], k: int, unit_group: Dict[int, str], caps: Dict[str, int], widths: Dict[str, int],
          round_to: int, keep_narrow: bool = False, blocks: Optional[Dict[str, int]] = None) -> Set[int]:
    """The first ``k`` ranked units that fit the per-group caps, then rounded so kept widths are multiples of
    ``round_to`` (rounding keeps more, never less); with ``keep_narrow`` a group at most ``round_to`` wide loses
    nothing. ``blocks``: group id -> a block of its own (a latency cost model's kernel block): that group rounds
    to the lcm of both. Units a rounded group keeps do not pass to other groups (the bisection on ``k`` does
    that)."""
    blocks = blocks or {}
    taken: Dict[str, List[int]] = {}
    base, count = round_to, 0
    for u in ranked:
        if count >= k:
            break
        g = unit_group[u]
        if len(taken.get(g, [])) < caps[g]:
            taken.setdefault(g, []).append(u)
            count += 1
    removed: Set[int] = set()
    for g, units in taken.items():
        n = len(units)
        round_to = math.lcm(base, blocks.get(g, 1))
        if round_to > 1 and widths[g] > round_to:
            kept = widths[g] - n
            kept = min(widths[g], int(math.ceil(kept / round_to)) * round_to)
            n = widths[g] - kept
        elif round_to > 1 and keep_narrow:
            n = 0
        removed.update(units[:n])
    return removed


def select(coupling: Coupling, scores: Dict[int, float], budget: Budget,
           estimate: Optional[Callable[[Set[int]], float]] = None, target_macs: Optional[float] = None,
           widths0: Optional[Dict[str, int]] = None, blocks: Optional[Dict[str, int]] = None) -> Set[int]:
    """Units to remove. ``scores``: unit -> importance (lower goes first). For a MAC budget,
    ``estimate(removed) -> MACs`` and the absolute ``target_macs`` are required. ``widths0``: group id ->
    width before the first pruning step (for the per-layer cap; default: the current widths). ``blocks``: group
    id -> the block the cost model says its kept width should be a multiple of (a latency budget's: channels that
    do not cross a block edge buy no time); None for MAC and channel budgets."""
    unit_group = coupling.unit_group()
    ranked = sorted(unit_group, key=lambda u: (scores.get(u, 0.0), u))
    caps = _caps(coupling, budget, widths0)
    widths = {g.id: g.width for g in coupling.groups}
    take = lambda k: _take(ranked, k, unit_group, caps, widths, int(budget.round_to), budget.keep_narrow,  # noqa: E731
                           blocks)
    if not ranked:
        raise BudgetError("the model has no prunable channels (every channel is pinned by the network's output, "
                          "ignore=, or barriers). What to do: inspect the barriers with obafx.report() / "
                          "`obafx inspect`, or mark unsupported submodules as leaf_modules.")
    if budget.channels is not None:
        return take(int(round(budget.channels * len(ranked))))
    if estimate(set()) <= target_macs:
        return set()
    lo, hi = 0, len(ranked)
    if estimate(take(hi)) > target_macs:
        raise BudgetError(
            f"the MAC budget cannot be met: removing every removable channel (at most {budget.max_layer_ratio:.0%} "
            f"of each layer) leaves {estimate(take(hi)):.3g} MACs > target {target_macs:.3g}. What to do: ask for "
            "a larger macs= fraction, raise max_layer_ratio, or drop ignore= entries"
            + (", or drop keep_narrow=True (it leaves every group at most round_to wide whole)." if budget.keep_narrow
               else "."))
    while lo < hi:
        mid = (lo + hi) // 2
        if estimate(take(mid)) <= target_macs:
            hi = mid
        else:
            lo = mid + 1
    if not any(b > 1 for b in (blocks or {}).values()):
        return take(lo)
    return _closest_with_plain_groups(take(lo), take(max(lo - 1, 0)), ranked, unit_group, blocks, estimate,
                                      target_macs, lambda units, k: _take(units, k, unit_group, caps, widths,
                                                                          int(budget.round_to), budget.keep_narrow))


def _closest_with_plain_groups(first: Set[int], before: Set[int], ranked: List[int], unit_group: Dict[int, str],
                               blocks: Dict[str, int], estimate: Callable[[Set[int]], float], target: float,
                               take_plain: Callable[[List[int], int], Set[int]]) -> Set[int]:
    """The selection closest to ``target`` from below when some groups remove whole kernel blocks only.

    ``first``: the bisection's answer (the fewest ranked units that meet the target), ``before``: one ranked unit
    fewer. Between them a blocked group may jump by a whole block (64 channels of a GEMM is 10% of a ViT-B/16), so
    ``first`` can land far below the target. Here the blocked groups keep the removal of ``first`` or of
    ``before``, and the plain groups (no block: every channel buys time) are fitted again, in their own ranked
    order, with the fewest units that meet the target. Returns the candidate with the highest cost <= target
    (``first`` itself when nothing is closer); never one above the target."""
    is_blocked = lambda u: blocks.get(unit_group[u], 1) > 1  # noqa: E731
    plain = [u for u in ranked if not is_blocked(u)]
    best, best_cost = first, estimate(first)
    for fixed in ({u for u in first if is_blocked(u)}, {u for u in before if is_blocked(u)}):
        fits = lambda k: estimate(fixed | take_plain(plain, k)) <= target  # noqa: E731
        if not fits(len(plain)):
            continue
        lo, hi = 0, len(plain)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
        candidate = fixed | take_plain(plain, lo)
        cost = estimate(candidate)
        if best_cost < cost <= target:
            best, best_cost = candidate, cost
    return best
