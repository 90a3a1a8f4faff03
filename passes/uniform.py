"""Uniform widths: every layer of a kind keeps the same width (what a Hugging Face config can express).

Two groups are of one kind when their members are the same parameters up to layer indices
(``model.layers.0.mlp.up_proj.weight`` and ``model.layers.1.mlp.up_proj.weight``) and they have the same width.
``uniform_coupling`` bundles each kind rank by rank: the r-th least important unit of every group of the kind
becomes one unit (scored with their mean), so that a selection removes the same number of units from each.
Facts in, new facts out: the coupling's unit ids are relabelled (slot arrays and node planes alike).
``without_kept`` drops the groups holding listed parameter dims (compile_prune's ``keep_widths``).
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import replace
from typing import Dict, Iterable, List, Tuple

import numpy as np

from .errors import ConfigError
from .facts import Coupling, Group
from .labels import Plane

_INDEX = re.compile(r"\.\d+(?=\.)")


def kind_of(group: Group) -> Tuple:
    """The kind of a group: its members with layer indices blanked, and its width."""
    return tuple(sorted((_INDEX.sub(".#", name), dim) for name, dim in group.members)), group.width


def uniform_coupling(coupling: Coupling, scores: Dict[int, float]) -> Tuple[Coupling, Dict[int, float]]:
    """``coupling`` and ``scores`` with every kind of two or more groups bundled rank by rank (module docstring).
    Groups of a kind of their own are left as they are."""
    kinds: Dict[Tuple, List[Group]] = {}
    for g in coupling.groups:
        kinds.setdefault(kind_of(g), []).append(g)
    relabel: Dict[int, int] = {}
    new_scores = dict(scores)
    groups = []
    for g in coupling.groups:
        same = kinds[kind_of(g)]
        if len(same) == 1:
            groups.append(g)
            continue
        if same[0] is not g:  # bundled into the kind's first group
            continue
        ranked = [sorted(h.units, key=lambda u: (scores.get(u, 0.0), u)) for h in same]
        heads = []
        for bundle in zip(*ranked):
            heads.append(bundle[0])
            new_scores[bundle[0]] = float(np.mean([scores.get(u, 0.0) for u in bundle]))
            for u in bundle[1:]:
                relabel[u] = bundle[0]
                new_scores.pop(u, None)
        members = tuple(dict.fromkeys(m for h in same for m in h.members))
        groups.append(Group(g.id, tuple(sorted(heads)), members))
    if not relabel:
        return coupling, scores
    lut = _lookup(coupling, relabel)
    slots = {key: lut[units] for key, units in coupling.slot_units.items()}
    nodes = {name: _relabel_planes(planes, lut) for name, planes in coupling.node_units.items()}
    return Coupling.frozen(groups, slots, coupling.slot_roles, nodes, coupling.pinned, coupling.barriers), new_scores


def _lookup(coupling: Coupling, relabel: Dict[int, int]) -> np.ndarray:
    """An array mapping every unit id to its new id (itself unless relabelled)."""
    top = max([int(a.max()) for a in coupling.slot_units.values() if a.size] + list(relabel) + [coupling.pinned])
    lut = np.arange(top + 1, dtype=np.int64)
    lut[list(relabel)] = list(relabel.values())
    return lut


def _relabel_planes(planes, lut: np.ndarray):
    """Node planes (nested tuples of Planes of unit ids) with ids mapped through ``lut`` (ids past it stay)."""
    if isinstance(planes, Plane):
        arr = planes.arr.copy()
        inside = arr < lut.size
        arr[inside] = lut[arr[inside]]
        return Plane(planes.dims, arr)
    if isinstance(planes, tuple):
        return tuple(_relabel_planes(p, lut) for p in planes)
    return planes


def without_kept(coupling: Coupling, keep: Iterable[str]) -> Coupling:
    """``coupling`` without the groups that hold a parameter dim matching one of ``keep`` ("parameter name:dim",
    shell-style wildcards, e.g. ``*.self_attn.q_proj.weight:0``): selection never sees their units, so those
    widths stay. Finer than compile_prune's ``ignore`` (which pins every dim of a module's parameters, its input
    channels included). ConfigError for a pattern that matches no parameter dim of the model."""
    keep = [keep] if isinstance(keep, str) else list(keep)
    slots = [f"{name}:{dim}" for name, dim in coupling.slot_units]
    for pattern in keep:
        if not isinstance(pattern, str) or not fnmatch.filter(slots, pattern):
            raise ConfigError(f"keep_widths entry {pattern!r} matches no parameter dim of the captured model. What "
                              f"to do: write 'parameter name:dim' (wildcards allowed), e.g. {slots[:3]}.")
    kept = [g for g in coupling.groups
            if not any(fnmatch.fnmatchcase(f"{n}:{d}", p) for n, d in g.members for p in keep)]
    return replace(coupling, groups=tuple(kept)) if len(kept) < len(coupling.groups) else coupling
