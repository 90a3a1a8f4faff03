"""Plans: removed units in, kept indices per parameter dim and per node dim out (and back, for replay)."""
from __future__ import annotations

from typing import Any, Dict, Optional, Set, Tuple

import numpy as np

from .errors import PlanError
from .facts import Coupling, PrunePlan
from .labels import Plane


def plan_from_removed(coupling: Coupling, removed: Set[int]) -> PrunePlan:
    """Kept indices of every parameter dim that loses at least one index."""
    removed_arr = np.array(sorted(removed), dtype=np.int64)
    kept: Dict[str, Dict[int, Tuple[int, ...]]] = {}
    for (name, dim), units in coupling.slot_units.items():
        gone = np.isin(units, removed_arr)
        if gone.any():
            kept.setdefault(name, {})[dim] = tuple(int(i) for i in np.nonzero(~gone)[0])
    return PrunePlan(kept, tuple(sorted(int(u) for u in removed)))


def removed_from_plan(coupling: Coupling, plan: PrunePlan) -> Set[int]:
    """The units a saved plan removes on this model; PlanError if it does not fit the model's coupling."""
    removed: Set[int] = set()
    slots = coupling.slot_units
    for name, dims in plan.kept.items():
        for dim, idx in dims.items():
            if (name, dim) not in slots:
                raise PlanError(f"the plan changes '{name}' dim {dim}, which this model cannot prune (or lacks). "
                                "What to do: apply the plan to the architecture it was made for.")
            units = slots[(name, dim)]
            if idx and max(idx) >= len(units):
                raise PlanError(f"the plan keeps index {max(idx)} of '{name}' dim {dim}, which has {len(units)}. "
                                "What to do: apply the plan to the architecture it was made for.")
            mask = np.ones(len(units), dtype=bool)
            mask[list(idx)] = False
            removed.update(int(u) for u in np.unique(units[mask]))
    if coupling.pinned in removed:
        raise PlanError("the plan removes channels this model must keep. What to do: apply the plan to the "
                        "architecture (and leaf_modules/ignore settings) it was made for.")
    check = plan_from_removed(coupling, removed)
    if check.kept != {n: dict(d) for n, d in plan.kept.items()}:
        raise PlanError("the plan is not consistent with this model's coupled channels (it removes part of a "
                        "coupled group). What to do: apply the plan to the architecture it was made for.")
    return removed


def node_kept(coupling: Coupling, shapes: Dict[str, Any], removed: Set[int]) -> Dict[str, Any]:
    """For each node, per tensor dim, the kept indices (None where the dim does not change)."""
    removed_arr = np.array(sorted(removed), dtype=np.int64)
    return {name: _kept_value(coupling.node_units.get(name, ()), shape, removed_arr)
            for name, shape in shapes.items()}


def _kept_value(planes: Any, shape: Any, removed: np.ndarray) -> Any:
    if shape is None:
        return None
    if any(isinstance(s, tuple) or s is None for s in shape):  # a tuple of values, not a tensor shape
        planes = planes if isinstance(planes, tuple) and len(planes) == len(shape) else ((),) * len(shape)
        return tuple(_kept_value(p, s, removed) for p, s in zip(planes, shape))
    return _kept_tensor(tuple(p for p in planes if isinstance(p, Plane)), shape, removed)


def _kept_tensor(planes, shape, removed: np.ndarray) -> Tuple[Optional[np.ndarray], ...]:
    out: list = [None] * len(shape)
    for p in planes:
        gone = np.isin(p.arr, removed)
        if not gone.any():
            continue
        kept_by_dim = {}
        for d in p.dims:
            others = tuple(e for e in range(gone.ndim) if e != d)
            kept_by_dim[d] = ~np.all(gone, axis=others)
        grid = np.ones((1,) * gone.ndim, dtype=bool)
        for d, k in kept_by_dim.items():
            grid = grid & k.reshape([-1 if e == d else 1 for e in range(gone.ndim)])
        if not np.array_equal(np.broadcast_to(grid, gone.shape), ~gone):
            raise AssertionError(f"internal: non-rectangular removal on dims {p.dims}")
        for d, k in kept_by_dim.items():
            idx = np.nonzero(k)[0]
            if out[d] is not None and not np.array_equal(out[d], idx):
                raise AssertionError(f"internal: planes disagree on dim {d}")
            out[d] = idx
    return tuple(out)
