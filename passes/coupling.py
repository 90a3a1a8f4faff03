"""Coupling: the channel analysis's unions in, coupled groups of prunable units out.

Connected components of the union graph are the units (channel classes). A unit is prunable when it is not
pinned (label 0's component) and some layer produces it (it holds an "out" slot). Units touching exactly the
same parameter slots form a group.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, Iterable, List, Sequence, Tuple

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from .errors import ConfigError, describe_node
from .facts import ChannelFacts, Coupling, Group
from .labels import PIN, Plane, iter_planes, squeeze_to_dims


def _components(n_labels: int, pairs: Sequence[np.ndarray]) -> np.ndarray:
    """Component id of every label, given union pairs."""
    edges = np.concatenate(pairs, axis=1) if pairs else np.zeros((2, 0), dtype=np.int64)
    graph = sp.coo_matrix((np.ones(edges.shape[1], dtype=np.int32), (edges[0], edges[1])), shape=(n_labels, n_labels))
    _, comp = connected_components(graph, directed=False)
    return comp


def _pin_ignored(facts: ChannelFacts, ignore: Iterable[str], pins: List[np.ndarray]) -> None:
    """Pin every slot owned by an ignored module (a name or a prefix of module names): appends to ``pins``."""
    ignore = list(ignore)
    matched = set()
    for (name, _), (slot, labels) in facts.store.slots.items():
        for prefix in ignore:
            if name == prefix or name.startswith(prefix + "."):
                pins.append(labels)
                matched.add(prefix)
    unknown = [p for p in ignore if p not in matched]
    if unknown:
        owners = sorted({s.owner for s, _ in facts.store.slots.values()})
        raise ConfigError(
            f"ignore={unknown} matches no parameter of the traced model. What to do: use module qualified names "
            f"as in model.named_modules(), e.g. one of {owners[:8]}{' ...' if len(owners) > 8 else ''}."
        )


def _narrow_slots(facts: ChannelFacts) -> List[np.ndarray]:
    """A width-1 slot can never shrink (it would vanish), and planes do not carry it: its labels, to pin."""
    return [labels for slot, labels in facts.store.slots.values() if labels.shape[0] == 1]


def _pin_pairs(pins: List[np.ndarray]) -> List[np.ndarray]:
    """Union pairs tying every label in ``pins`` to PIN."""
    flat = np.concatenate([np.asarray(p, dtype=np.int64).reshape(-1) for p in pins]) if pins else np.zeros(0, np.int64)
    flat = flat[flat != PIN]
    return [np.stack([flat, np.full_like(flat, PIN)])] if flat.size else []


def _rectangular(facts: ChannelFacts, comp: np.ndarray, extra: List[np.ndarray]) -> bool:
    """Make every multi-dim plane depend on one dim only (so removals stay rectangular): the unions that does are
    appended to ``extra``. True if nothing had to change."""
    for value in facts.planes.values():
        for p in iter_planes(value):
            if len(p.dims) < 2:
                continue
            units = comp[p.arr]
            if any(np.all(units == squeeze_to_dims(units, (d,))) for d in p.dims):
                continue
            keep = max(p.dims, key=lambda d: p.arr.shape[d])
            a, b = np.broadcast_arrays(p.arr, squeeze_to_dims(p.arr, (keep,)))
            extra.append(np.stack([a.reshape(-1), b.reshape(-1)]).astype(np.int64))
            return False  # components are stale now: recompute before judging another plane
    return True


def _map_units(value: Any, comp: np.ndarray) -> Any:
    """A node's planes with labels mapped to units (``comp``), nested tuples and lists as tuples."""
    if isinstance(value, Plane):
        return Plane(value.dims, comp[value.arr])
    if isinstance(value, (tuple, list)):  # a list comprehension with planes inline: one call a node, not three
        return tuple([Plane(v.dims, comp[v.arr]) if type(v) is Plane else _map_units(v, comp) for v in value])
    return value


def couple(facts: ChannelFacts, ignore: Iterable[str] = ()) -> Coupling:
    """Groups of prunable units of ``facts``; ``ignore`` names modules whose widths must not change.

    Pure: the pins and unions this adds live in a local list beside ``facts.store.pairs``, so calls with
    different ``ignore`` on the same facts do not add up."""
    pins: List[np.ndarray] = []
    _pin_ignored(facts, ignore, pins)
    extra = _pin_pairs(pins + _narrow_slots(facts))
    while True:  # each pass merges at least two units, so this ends
        comp = _components(facts.store.next_label, list(facts.store.pairs) + extra)
        if _rectangular(facts, comp, extra):
            break
    pinned = int(comp[PIN])
    slot_units = {key: comp[labels] for key, (slot, labels) in facts.store.slots.items()}
    roles = {key: (slot.role, slot.owner) for key, (slot, _) in facts.store.slots.items()}
    groups = _groups(slot_units, roles, pinned)
    node_units = {name: _map_units(v, comp) for name, v in facts.planes.items()}
    return Coupling.frozen(groups, slot_units, roles, node_units, pinned, barrier_report(facts))


def _groups(slot_units: Dict, roles: Dict, pinned: int) -> Tuple[Group, ...]:
    """Units with an 'out' slot and not pinned, grouped by the set of slots they touch."""
    classes = _same_units(slot_units)  # slots with identical unit arrays (a norm's four, a conv's input)
    reps = [keys[0] for keys in classes]
    units, slots_of = _slot_sets(reps, slot_units)
    groups = []
    # members sort 'out' slots first, then by key: rank every key once (groups share slots, densely on DenseNets)
    by_key = sorted(roles)  # plain tuple order; then the 'out' slots move to the front, each part still sorted
    ordered_keys = [k for k in by_key if roles[k][0] == "out"] + [k for k in by_key if roles[k][0] != "out"]
    rank = {k: i for i, k in enumerate(ordered_keys)}
    ranks = [[rank[k] for k in keys] for keys in classes]  # sorting ints beats sorting keys by a key function
    has_out = [any(roles[k][0] == "out" for k in keys) for keys in classes]
    first_index = np.zeros(int(units.max()) + 1 if units.size else 0, dtype=np.int64)  # scratch, reused per group
    for members, unit_ids in _same_slot_sets(units, slots_of, len(reps), pinned):
        members = members.tolist()
        if not any(has_out[i] for i in members):
            continue
        order = [r for i in members for r in ranks[i]]
        order.sort()
        ordered = tuple([ordered_keys[r] for r in order])
        root = ordered[0]
        groups.append(Group(f"{roles[root][1]}:{root[1]}" if root[1] else roles[root][1],
                            tuple(_in_slot_order(unit_ids, slot_units[root], first_index).tolist()), ordered))
    groups.sort(key=lambda g: g.id)
    return _unique_ids(groups)


def _in_slot_order(unit_ids: np.ndarray, root_units: np.ndarray, first_index: np.ndarray) -> np.ndarray:
    """``unit_ids`` (each touches the root slot) in the order of their first index in ``root_units``.
    ``first_index``: scratch, at least as long as the largest unit id + 1."""
    if root_units.size == unit_ids.size:  # every position of the root slot holds a distinct unit of the group
        return root_units
    first_index[root_units[::-1]] = np.arange(len(root_units) - 1, -1, -1)  # the first index wins
    return unit_ids[np.argsort(first_index[unit_ids], kind="stable")]


def _same_units(slot_units: Dict) -> List[List]:
    """Slot keys grouped by identical unit arrays, in first-seen order. A unit touches one slot of a class iff it
    touches all of them, so grouping units by the classes they touch equals grouping them by slots, on fewer
    slots."""
    classes: Dict[bytes, List] = {}
    for key, units in slot_units.items():
        classes.setdefault(units.tobytes(), []).append(key)
    return list(classes.values())


def _slot_sets(keys: List, slot_units: Dict) -> Tuple[np.ndarray, np.ndarray]:
    """(unit, slot index) pairs, each once, sorted by unit then slot (vectorised: models have 10^5 channels)."""
    n = len(keys) + 1
    if not keys:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    codes = _sorted_unique(np.concatenate([slot_units[k] for k in keys]) * n
                           + np.repeat(np.arange(len(keys)), [len(slot_units[k]) for k in keys]))
    return np.divmod(codes, n)


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """``np.unique(a)`` for 1-D int arrays by sorting (numpy 2's hash-based unique is slower here). The stable
    sort (timsort) takes the ascending runs the callers' codes come in (one per slot) at a tenth of quicksort's
    time; the result is the same, being sorted and unique."""
    a = np.sort(a, kind="stable")
    return a[np.concatenate(([True], a[1:] != a[:-1]))] if a.size else a


def _same_slot_sets(units: np.ndarray, slots: np.ndarray, n_slots: int, pinned: int):
    """Yield (slot indices, unit ids) for each set of units touching exactly the same slots (both arrays), but
    the set holding unit ``pinned``; ``units``/``slots`` as `_slot_sets` returns them (each pair once, sorted by
    unit then slot).

    Units are bucketed by a 128-bit random hash of their slot set (and its size), then each bucket is checked
    exactly: every unit's sorted slot list equals the list of its bucket's first unit.
    """
    if units.size == 0:
        return
    start = np.flatnonzero(np.concatenate(([True], units[1:] != units[:-1])))  # units come sorted (`_slot_sets`)
    ids, count = units[start], np.diff(np.append(start, units.size))
    weights = np.random.default_rng(0).integers(-2**62, 2**62, size=(2, n_slots), dtype=np.int64)
    with np.errstate(over="ignore"):  # wrapping sums are fine for a hash
        hashes = np.add.reduceat(weights[:, slots], start, axis=1)
    order = np.lexsort((count, hashes[1], hashes[0]))
    keys = np.stack([hashes[0][order], hashes[1][order], count[order]])
    bucket = np.empty_like(order)
    bucket[order] = np.cumsum(np.concatenate(([False], np.any(keys[:, 1:] != keys[:, :-1], axis=0))))
    order = np.argsort(bucket, kind="stable")  # units of one bucket together, in unit order
    cuts = np.flatnonzero(np.diff(bucket[order])) + 1
    first = order[np.concatenate(([0], cuts))]  # each bucket's first unit, by bucket
    _check_same_slots(slots, start, count, first[bucket])
    skip = bucket[np.searchsorted(ids, pinned)] if pinned in ids else -1
    for b, members in enumerate(np.split(order, cuts)):
        if b != skip:
            f = first[b]
            yield slots[start[f]:start[f] + count[f]], ids[members]


def _check_same_slots(slots: np.ndarray, start: np.ndarray, count: np.ndarray, ref: np.ndarray) -> None:
    """Raise unless every unit ``i``'s slot list (``slots[start[i]:start[i] + count[i]]``) equals unit
    ``ref[i]``'s (a hash collision: 2^-128 odds, but never group on a guess). Units of one bucket have one count."""
    if not np.array_equal(count[ref], count):
        raise AssertionError("internal: slot-set hash collision")
    unit = np.repeat(np.arange(count.size), count)
    same = slots[np.arange(slots.size) - start[unit] + start[ref[unit]]]
    if not np.array_equal(same, slots):
        raise AssertionError("internal: slot-set hash collision")


def _unique_ids(groups: List[Group]) -> Tuple[Group, ...]:
    seen: Dict[str, int] = defaultdict(int)
    out = []
    for g in groups:
        seen[g.id] += 1
        out.append(g if seen[g.id] == 1 else Group(f"{g.id}#{seen[g.id]}", g.units, g.members))
    return tuple(out)


def barrier_report(facts: ChannelFacts) -> List[Dict[str, str]]:
    """The barriers as rows a person can read: node, op and source line, and why."""
    nodes = {n.name: n for n in facts.traced.gm.graph.nodes}
    return [{"node": name, "where": describe_node(nodes[name]), "why": why} for name, why in facts.store.barriers]
