"""Kernel blocks in a layer's latency: whether its cost is a step function of a width, and the width rounding
select() should apply per group because of it.

Blocked kernels pad a width up to a multiple of their block (oneDNN's nChw16c / nChw8c layouts on CPUs, tensor
core tiles on GPUs): a conv 17 channels wide costs what a 32-wide one costs. A grid of widths interpolated
linearly cannot see that, so the selector would remove channels that buy nothing. Which block a layer has is read
from measurements, never assumed: the layer is timed at a candidate block edge ``e``, at ``e + 1`` and at
``e + B``; when most of the block's cost comes with the first channel past the edge, cost(e + 1) ~ cost(e + B),
the cost is a step function with block ``B``. The largest candidate that shows the step is the block (a 16-block
also looks like an 8- or a 4-block at a multiple of 16; a 32-block candidate then sees two steps, half its span),
once the step is seen again one block lower (a timing spike on a loaded machine is not seen twice).

Pure: costs come in as a callable (the timer in obafx/latency_timing.py, a fake in tests), blocks come out.
"""
from __future__ import annotations

import math
from functools import reduce
from typing import Callable, Dict, Iterable, Sequence, Tuple

# The share of a block's cost that must come with its first channel for the cost to be a step: a cost linear in
# the width gives 1/B (<= 0.25), a candidate twice the true block 0.5, a step 1 (0.6-0.9 measured on a loaded CPU).
JUMP = 0.65
# A block's cost must exceed this fraction of the layer's cost to tell it from timing noise (5-7% seen between
# neighbouring widths on a loaded 2-core machine); smaller blocks pad away less than this anyway.
FLOOR = 0.05
DEFAULT_CANDIDATES = (4, 8, 16, 32, 64)
# A group is rounded to its block while the layers where every channel buys time hold at most this share of the
# time of the layers it runs through (what those channels buy there is smaller than the cost model's error).
PLAIN_SHARE = 0.1


def _edge(width: int, block: int, top: int) -> int:
    """The block edge to probe ``block`` at: the multiple of ``top`` (the largest candidate probed) just below
    ``width`` when ``block`` divides it (one edge shared by power-of-two candidates), else ``block``'s own."""
    shared = ((width - 1) // top) * top
    return shared if shared % block == 0 else ((width - 1) // block) * block


def probe_plan(width: int, candidates: Iterable[int]) -> Dict[int, Tuple[int, int, int]]:
    """Per usable candidate block ``B`` (2 <= B < width: an edge below the width exists): the widths to time,
    (edge, edge + 1, edge + B). Widths above ``width`` are fine: they are standalone layers."""
    usable = sorted({int(b) for b in candidates if 2 <= int(b) < width})
    if not usable:
        return {}
    top = usable[-1]
    return {b: (_edge(width, b, top), _edge(width, b, top) + 1, _edge(width, b, top) + b) for b in usable}


def probe_widths(width: int, candidates: Iterable[int]) -> Tuple[int, ...]:
    """Every width probe_plan times, once each, ascending."""
    return tuple(sorted({w for points in probe_plan(width, candidates).values() for w in points}))


def detect_block(width: int, candidates: Sequence[int], cost: Callable[[int], float]) -> int:
    """The block of a layer dim ``width`` wide whose ``cost(w)`` (seconds at width ``w``, the other dim fixed) is
    a step function, or 1 when no candidate shows a step (cost that grows with every channel, flat, or noise).
    ``cost`` is called once per width of probe_widths, plus a few widths to confirm a step (_confirmed)."""
    plan = probe_plan(width, candidates)
    seen: Dict[int, float] = {}

    def at(w: int) -> float:
        if w not in seen:
            seen[w] = float(cost(w))
        return seen[w]

    for w in probe_widths(width, candidates):
        at(w)
    for b in sorted(plan, reverse=True):  # the largest block that shows a step and repeats it
        if _is_step(at, plan[b][0], b) and _confirmed(cost, at, plan[b][0], b):
            return b
    return 1


def _is_step(at: Callable[[int], float], edge: int, block: int) -> bool:
    """Whether most of the cost from ``edge`` to ``edge + block`` comes with the first channel past the edge (and
    is more than timing noise)."""
    span = at(edge + block) - at(edge)
    return span > FLOOR * at(edge + block) and at(edge + 1) - at(edge) >= JUMP * span


def _confirmed(cost: Callable[[int], float], at: Callable[[int], float], edge: int, block: int) -> bool:
    """The same step one block lower (a kernel's block repeats at every edge; a timing spike does not), or, with
    no edge below, at the same widths timed again."""
    if edge - block >= 1:
        return _is_step(at, edge - block, block)
    again = {w: float(cost(w)) for w in (edge, edge + 1, edge + block)}
    return _is_step(again.__getitem__, edge, block)


def padded(width: float, block: int, full: int) -> float:
    """The width a block-``block`` kernel runs at for ``width`` kept channels: rounded up to the block, never
    above the layer's ``full`` width (which pads to the same block edge, or is narrower than it)."""
    if block <= 1 or width <= 0:
        return width
    return float(min(full, math.ceil(width / block) * block))


def aligned_widths(widths: Iterable[int], block: int, full: int) -> Tuple[int, ...]:
    """Grid widths moved up to their block edge (``full`` caps them): on a step-shaped cost only the edges carry
    information, and interpolating between edges is exact where the steps are even."""
    return tuple(sorted({int(padded(w, block, full)) for w in widths} | {int(full)}))


def group_blocks(unit_group: Dict[int, str], dims: Iterable[Tuple[Sequence[int], int, float]]) -> Dict[str, int]:
    """Per channel group, the block its kept width should be a multiple of. ``dims``: (a layer dim's unit ids,
    that dim's block, the layer's dense seconds). The block is the gcd of the blocks of the stepped dims the group
    runs through, when the dims without a step (block 1: every channel buys time there) carry at most PLAIN_SHARE
    of their seconds (a classifier after a blocked conv does not stop its rounding; a conv of its own does).
    Groups without a block are left out."""
    stepped: Dict[str, list] = {}
    plain: Dict[str, float] = {}
    for units, block, seconds in dims:
        for g in {unit_group[int(u)] for u in units if int(u) in unit_group}:
            if block > 1:
                stepped.setdefault(g, []).append((int(block), float(seconds)))
            else:
                plain[g] = plain.get(g, 0.0) + float(seconds)
    blocks = {}
    for g, pairs in stepped.items():
        total = sum(s for _, s in pairs) + plain.get(g, 0.0)
        if plain.get(g, 0.0) <= PLAIN_SHARE * total:
            blocks[g] = reduce(math.gcd, (b for b, _ in pairs))
    return {g: b for g, b in blocks.items() if b > 1}
