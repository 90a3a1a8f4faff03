"""Facts the stages exchange: frozen values keyed by names (fx node names, parameter qualified names).

Plans hold only ints and strings, so they go to JSON and back and replay on a fresh copy of the architecture.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np


@dataclass(frozen=True)
class Group:
    """Coupled channels: every unit (channel class) in ``units`` touches exactly the slots in ``members``.

    ``members`` are (parameter name, dim) pairs; removing a unit removes its index along each member dim.
    """

    id: str
    units: Tuple[int, ...]
    members: Tuple[Tuple[str, int], ...]

    @property
    def width(self) -> int:
        return len(self.units)


@dataclass(frozen=True, eq=False)
class Coupling:
    """The coupled groups of a traced model and the map from parameter slots to units (class ids)."""

    groups: Tuple[Group, ...]
    slot_units: Dict[Tuple[str, int], np.ndarray]
    slot_roles: Dict[Tuple[str, int], Tuple[str, str]]  # (role, owner)
    node_units: Dict[str, object]  # node name -> planes mapped to unit ids (same structure as planes)
    pinned: int
    barriers: Tuple[Dict[str, str], ...]

    def unit_group(self) -> Dict[int, str]:
        return {u: g.id for g in self.groups for u in g.units}


@dataclass(frozen=True)
class PrunePlan:
    """What to keep: for every parameter/buffer (original qualified name) that changes shape, the kept indices
    along each changed dim. ``removed_units`` is the analysis-level view used inside one run."""

    kept: Dict[str, Dict[int, Tuple[int, ...]]] = field(default_factory=dict)
    removed_units: Tuple[int, ...] = ()

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    def to_dict(self) -> Dict[str, Dict[str, List[int]]]:
        return {name: {str(d): list(idx) for d, idx in dims.items()} for name, dims in self.kept.items()}

    @staticmethod
    def from_dict(data: Dict[str, Dict[str, List[int]]]) -> "PrunePlan":
        kept = {name: {int(d): tuple(int(i) for i in idx) for d, idx in dims.items()} for name, dims in data.items()}
        return PrunePlan(kept)

    def compose(self, later: "PrunePlan") -> "PrunePlan":
        """This plan followed by ``later`` (whose indices refer to this plan's result), in original indices."""
        kept = {n: dict(d) for n, d in self.kept.items()}
        for name, dims in later.kept.items():
            for d, idx in dims.items():
                before = kept.get(name, {}).get(d)
                kept.setdefault(name, {})[d] = tuple(before[i] for i in idx) if before is not None else idx
        return PrunePlan(kept)
