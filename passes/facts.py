"""The vocabulary: the facts the stages exchange, frozen values keyed by names (fx node names, parameter
qualified names). The ground floor of passes/: it imports only errors and tensors, and every stage imports it.

    Traced (trace) -> ChannelFacts (channel_graph) -> Coupling of Groups (coupling) -> scores under a
    ScoreContext (importance) -> removed units under a Budget (select, fit) -> PrunePlan (plan) -> rewrite, verify

Plans hold only ints and strings, so they go to JSON and back and replay on a fresh copy of the architecture.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.fx as fx

from .errors import ConfigError
from .tensors import fingerprint

# The OBA mode used wherever none is given (compile_prune, parameter_scores, ScoreContext, the Torch-Pruning
# importances): the one place to change it. "residual" (H - G) is the paper's criterion, and on the accuracy
# benchmark (benchmarks/results/accuracy.json, ResNet-20 on Fashion-MNIST, 3 seeds) no OBA configuration stands out
# (residual per MAC 0.624 +- 0.213 at 2x recalibrated, train-mode residual by score 0.726 +- 0.025, full by score
# 0.698, level after fine-tuning) and Torch-Pruning's Taylor beats them all; see the README's known limits.
DEFAULT_MODE = "residual"


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


def read_only(array: np.ndarray) -> np.ndarray:
    """A read-only view of ``array`` (no copy): facts hand arrays on, and no stage may write into them."""
    view = array.view()
    view.flags.writeable = False
    return view


def frozen_map(mapping: Mapping, arrays: bool = False) -> Mapping:
    """A read-only mapping over a copy of ``mapping``; with ``arrays``, its array values read-only too."""
    if not arrays:
        return MappingProxyType(dict(mapping))
    return MappingProxyType({k: read_only(v) for k, v in mapping.items()})


@dataclass(frozen=True)
class Slot:
    """One dim of one parameter or buffer: ``name`` is its qualified name in the traced module."""

    name: str
    dim: int
    role: str  # "out" (a producer's channels), "in" (a consumer's channels) or "through" (norms, free params)
    owner: str  # the layer (module qualified name or node name) this slot belongs to


@dataclass(frozen=True, eq=False)
class Unions:
    """What the channel analysis recorded, frozen: ``next_label`` labels were handed out; ``pairs`` are the
    (2, n) label arrays that go together; ``slots`` maps (parameter name, dim) to its Slot and labels;
    ``barriers`` lists (node name, why) for ops that pinned their channels. A stage that adds unions (couple's
    pins) keeps its own list beside these, so two stages never see each other's additions."""

    next_label: int
    pairs: Tuple[np.ndarray, ...]
    slots: Mapping[Tuple[str, int], Tuple[Slot, np.ndarray]]
    barriers: Tuple[Tuple[str, str], ...]


@dataclass(frozen=True, eq=False)
class Coupling:
    """The coupled groups of a traced model and the map from parameter slots to units (class ids)."""

    groups: Tuple[Group, ...]
    slot_units: Mapping[Tuple[str, int], np.ndarray]  # read-only arrays (see ``frozen``)
    slot_roles: Mapping[Tuple[str, int], Tuple[str, str]]  # (role, owner)
    node_units: Mapping[str, object]  # node name -> planes mapped to unit ids (same structure as planes)
    pinned: int
    barriers: Tuple[Dict[str, str], ...]

    @staticmethod
    def frozen(groups, slot_units, slot_roles, node_units, pinned, barriers) -> "Coupling":
        """A Coupling over read-only copies of the given maps (the one way stages make one)."""
        return Coupling(tuple(groups), frozen_map(slot_units, arrays=True), frozen_map(slot_roles),
                        frozen_map(node_units), int(pinned), tuple(barriers))

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


@dataclass(frozen=True, eq=False)
class Recorded:
    """Every node's value (tensors as meta tensors) from one run of a module, and that module's fingerprint."""

    key: Tuple[Any, ...]
    values: Dict[str, Any]


@dataclass(frozen=True, eq=False)
class Traced:
    """A traced private copy of the model and the example inputs it was traced for.

    ``recorded`` (optional) holds the node values of the check run; `recorded_values` hands them out only while
    the module still has the graph and parameter shapes they were recorded for.
    """

    gm: fx.GraphModule
    inputs: Tuple[Any, ...]
    recorded: Optional[Recorded] = field(default=None, repr=False)

    def recorded_values(self, named: Optional[List[Tuple[str, torch.Tensor]]] = None) -> Optional[Dict[str, Any]]:
        """The recorded node values if they still describe ``gm`` (else None: run it again). ``named``:
        ``named_tensors(gm)`` taken now, when the caller has it."""
        rec = self.recorded
        if rec is None:
            return None
        try:
            return rec.values if rec.key == fingerprint(self.gm, self.inputs, named) else None
        except RuntimeError:  # a tensor constant in node arguments has no single truth value: record again
            return None


@dataclass(frozen=True, eq=False)
class ChannelFacts:
    """What the channel analysis found. ``planes`` and ``shapes`` are keyed by fx node name."""

    traced: Traced
    store: Unions  # the analysis' unions, frozen (named store for what used to be the live collector)
    planes: Mapping[str, Any]
    shapes: Mapping[str, Any]


@dataclass(frozen=True)
class ScoreContext:
    """What a criterion may use besides the model: calibration batches, the loss, OBA options, a seed."""

    batches: Optional[Any] = None
    loss_fn: Optional[Callable] = None
    mode: str = DEFAULT_MODE
    delta: float = 0.0
    train: bool = False
    seed: int = 0
    progress: bool = False
    chunk_size: Optional[int] = None
    normalizer: Optional[str] = "max"
    probes: int = 1
    confidence: float = 0.0  # oba_group: standard errors added to each unit's mean (an upper confidence bound)
    unit_sum: str = "signed"  # how a unit's parameter scores add up: "signed" |Σ s_i|, "abs" Σ |s_i|, "member"


@dataclass(frozen=True)
class Budget:
    """``macs``: fraction of the ORIGINAL MACs to keep; ``channels``: fraction of prunable units to remove;
    ``latency``: fraction of the dense model's measured latency to keep (selected like ``macs``, with a latency
    estimate in place of the MAC one). ``round_to``: kept widths are multiples of it (groups at most ``round_to``
    wide prune freely, unless ``keep_narrow``: then they keep their whole width)."""

    macs: Optional[float] = None
    channels: Optional[float] = None
    max_layer_ratio: float = 0.95
    round_to: int = 1
    latency: Optional[float] = None
    keep_narrow: bool = False

    def __post_init__(self):
        for name in ("macs", "channels", "max_layer_ratio", "round_to", "latency"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ConfigError(f"{name}={v!r} is not a number. What to do: pass e.g. {name}=0.5.")
        if [self.macs, self.channels, self.latency].count(None) != 2:
            raise ConfigError("give exactly one budget: macs=<fraction of MACs to keep>, channels=<fraction of "
                              "channels to remove> or latency=<fraction of the measured latency to keep, or '2x'>. "
                              "What to do: e.g. compile_prune(model, x, macs=0.5).")
        for name in ("macs", "channels", "latency"):
            v = getattr(self, name)
            if v is not None and not (0.0 < v <= 1.0):
                raise ConfigError(f"{name}={v} is outside (0, 1]. What to do: pass a fraction, e.g. {name}=0.5.")
        if not (0.0 <= self.max_layer_ratio < 1.0):
            raise ConfigError(f"max_layer_ratio={self.max_layer_ratio} must be in [0, 1): a layer must keep a channel.")
        if int(self.round_to) < 1:
            raise ConfigError(f"round_to={self.round_to} must be a positive integer.")
        if not isinstance(self.keep_narrow, bool):
            raise ConfigError(f"keep_narrow={self.keep_narrow!r} is not a bool. What to do: pass True or False.")
        if self.keep_narrow and int(self.round_to) < 2:
            raise ConfigError("keep_narrow=True leaves whole the groups at most round_to wide, and round_to is 1. "
                              "What to do: pass round_to= the kernels' channel block too (e.g. round_to=16), or "
                              "drop keep_narrow.")
