"""Cost-aware ranking (``rank="per_mac"``): raw unit scores and what removing each unit saves in, score per cost
unit out.

A unit's cost is what its removal alone saves from the current module: MACs under a MAC budget (from the per-layer
MAC model select uses, so thop's count per module), parameters under a channel budget. Ranking by raw score per
MAC saved removes first the units that buy the most MACs per unit of loss: a channel of a late, narrow-resolution
layer (many parameters, few MACs) is no longer as cheap to remove as a channel of an early, full-resolution one.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
from torch import nn

from .facts import Coupling
from .macs import MacModel

__all__ = ["unit_costs", "per_cost", "mac_savings", "param_savings"]


def mac_savings(coupling: Coupling, per_module: Dict[str, float]) -> Dict[int, float]:
    """Unit -> MACs saved by removing that unit alone (`MacModel.savings` on every prunable unit)."""
    return MacModel(coupling, per_module).savings(u for g in coupling.groups for u in g.units)


def param_savings(model: nn.Module, coupling: Coupling) -> Dict[int, float]:
    """Unit -> parameters removed with that unit: over every parameter slot (name, dim) it touches, the size of
    one index along the dim (numel / length) per position it holds."""
    params = dict(model.named_parameters())
    saved: Dict[int, float] = {int(u): 0.0 for g in coupling.groups for u in g.units}
    for (name, dim), units in coupling.slot_units.items():
        if name not in params:
            continue
        per_index = params[name].numel() / max(len(units), 1)
        ids, counts = np.unique(units, return_counts=True)
        for u, c in zip(ids.tolist(), counts.tolist()):
            if u in saved:
                saved[u] += per_index * c
    return saved


def unit_costs(model: nn.Module, coupling: Coupling, per_module: Optional[Dict[str, float]]) -> Dict[int, float]:
    """MAC savings when ``per_module`` (thop MACs per module) is given, else parameter savings."""
    return mac_savings(coupling, per_module) if per_module is not None else param_savings(model, coupling)


def per_cost(scores: Dict[int, float], costs: Dict[int, float]) -> Dict[int, float]:
    """Unit -> raw score / cost. A unit that saves nothing gets +inf (never worth removing) unless its score is
    zero or negative (removing it costs nothing either: it goes first)."""
    out = {}
    for u, s in scores.items():
        c = costs.get(u, 0.0)
        out[u] = s / c if c > 0 else (float("inf") if s > 0 else s)
    return out
