"""Latency cost model: each prunable layer's latency as a function of its kept in/out widths, from a measured grid.

Pure: the per-layer tables come in (measured on the real device by obafx/latency_timing.py, cached by
passes/latency_cache.py), and `LatencyModel.estimate(removed) -> seconds` comes out, in the form select() takes
for a budget (`estimate(removed units) -> cost`). Layers are convolutions and linears called as modules; what the
tables do not cover (norms, activations, attention matmuls, pooling) is the "rest": the measured end-to-end time
minus the layers' dense times, scaled by the kept fraction of the output elements of the untimed nodes
(`element_weights`: element-wise work grows with the elements it writes; a softmax over tokens does not shrink when
channels go, a GELU on an MLP's hidden units does). The caller measures the candidate end to end and corrects the aim, so the model only has to
rank well and be roughly right.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch.fx as fx
from torch import nn

from .facts import Coupling
from .latency_blocks import aligned_widths, group_blocks, padded
from .labels import Plane

Slot = Tuple[str, int]


@dataclass(frozen=True)
class LayerSpec:
    """One call of a prunable layer, as a standalone copy needs it.

    ``kind``: "conv" or "linear"; ``config``: the hyper-parameters of a same-kind layer (conv: spatial dims,
    kernel, stride, padding, dilation; both: bias); ``input_shape``: the shape of the input it is called on
    (batch included, the channel/feature dim at the widths of the dense layer); ``in_slot``/``out_slot``: the
    coupling's weight slots whose kept units set the widths (None: that width never changes). ``tied``: a
    depthwise conv, whose in width is its out width."""

    name: str
    kind: str
    in_width: int
    out_width: int
    input_shape: Tuple[int, ...]
    config: Tuple[Any, ...]
    in_slot: Optional[Slot]
    out_slot: Optional[Slot]
    tied: bool = False

    def prunable_dims(self) -> Tuple[Tuple[str, int, Slot], ...]:
        """The dims whose width pruning changes, as ("out" / "in", dense width, slot); a tied (depthwise) layer's
        in width follows its out width, so only its out dim counts."""
        dims = (("out", self.out_width, self.out_slot),) if self.out_slot is not None else ()
        return dims + ((("in", self.in_width, self.in_slot),) if self.in_slot is not None and not self.tied else ())

    def signature(self) -> str:
        """What the layer's latency depends on (not its name): the cache key of its table."""
        return (f"{self.kind}|in={self.in_width}|out={self.out_width}|x={list(self.input_shape)}"
                f"|cfg={list(self.config)}|tied={int(self.tied)}|pin={int(self.in_slot is None)}{int(self.out_slot is None)}")


@dataclass(frozen=True)
class LayerTable:
    """Measured seconds of one layer on a grid of widths: ``seconds[i][j]`` at in width ``in_widths[i]`` and out
    width ``out_widths[j]``. A table with one row does not depend on the in width (a pinned in width, or a tied
    layer measured at in = out = ``out_widths[j]``)."""

    in_widths: Tuple[int, ...]
    out_widths: Tuple[int, ...]
    seconds: Tuple[Tuple[float, ...], ...]
    in_block: int = 1
    out_block: int = 1

    def at(self, in_width: float, out_width: float) -> float:
        """Seconds at these widths: each width first padded up to its dim's block (a step-shaped cost, see
        passes/latency_blocks.py; block 1: none), then bilinear inside the grid, linear beyond it (never below
        zero)."""
        in_width = padded(in_width, self.in_block, self.in_widths[-1])
        out_width = padded(out_width, self.out_block, self.out_widths[-1])
        rows = [_interp(self.out_widths, row, out_width) for row in self.seconds]
        value = rows[0] if len(rows) == 1 else _interp(self.in_widths, rows, in_width)
        return max(0.0, value)

    def monotone(self) -> "LayerTable":
        """The same table made non-decreasing in both widths (running maximum along each axis): a timing dip at
        a wider layer is noise or an alignment effect the grid is too coarse to model, and an estimate that can
        fall as channels come back would make select's bisection arbitrary."""
        grid = np.maximum.accumulate(np.maximum.accumulate(np.asarray(self.seconds, dtype=np.float64), axis=0),
                                     axis=1)
        return replace(self, seconds=tuple(tuple(float(v) for v in row) for row in grid))

    def to_dict(self) -> Dict[str, Any]:
        return {"in": list(self.in_widths), "out": list(self.out_widths), "seconds": [list(r) for r in self.seconds],
                "in_block": self.in_block, "out_block": self.out_block}

    @staticmethod
    def from_dict(data: Dict[str, Any]) -> "LayerTable":
        table = LayerTable(tuple(int(w) for w in data["in"]), tuple(int(w) for w in data["out"]),
                           tuple(tuple(float(s) for s in row) for row in data["seconds"]),
                           int(data.get("in_block", 1)), int(data.get("out_block", 1)))
        if len(table.seconds) != len(table.in_widths) or any(len(r) != len(table.out_widths) for r in table.seconds):
            raise ValueError("table shape does not match its widths")
        if min(table.in_block, table.out_block) < 1:
            raise ValueError("a block size below 1")
        return table


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear through (xs, ys) with the end segments extended (np.interp alone would clamp)."""
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if xs.size == 1:
        return float(ys[0])
    if x < xs[0]:
        return float(ys[0] + (x - xs[0]) * (ys[1] - ys[0]) / (xs[1] - xs[0]))
    if x > xs[-1]:
        return float(ys[-1] + (x - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
    return float(np.interp(x, xs, ys))


def grid_widths(width: int, fractions: Sequence[float], prunable: bool, block: int = 1) -> Tuple[int, ...]:
    """The widths to measure a dim at: ``fractions`` of ``width`` (rounded, at least 1, distinct, ascending;
    moved up to their ``block`` edge, where a step-shaped cost changes), or only ``width`` when the dim is never
    pruned."""
    if not prunable:
        return (int(width),)
    return aligned_widths({max(1, int(round(f * width))) for f in fractions}, block, int(width))


def layer_specs(gm: fx.GraphModule, shapes: Dict[str, Any], coupling: Coupling) -> List[LayerSpec]:
    """Every call of an nn.Conv1d/2d/3d (ungrouped or depthwise) or nn.Linear in ``gm`` whose widths the
    coupling can change, with the shape of its input (``shapes``: node name -> shape, from the analysis)."""
    modules = dict(gm.named_modules())
    prunable = np.asarray(sorted(coupling.unit_group()), dtype=np.int64)
    slots = {k: u for k, u in coupling.slot_units.items() if np.isin(u, prunable).any()}  # pinned slots never change
    specs = []
    for node in gm.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if module is None or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        spec = _spec(node.target, module, shapes.get(node.args[0].name), slots)
        if spec is not None and (spec.in_slot or spec.out_slot):
            specs.append(spec)
    return specs


def _spec(name: str, module: nn.Module, shape: Any, slots) -> Optional[LayerSpec]:
    if not isinstance(shape, tuple) or not all(isinstance(s, int) for s in shape):
        return None
    weight = f"{name}.weight"
    out_slot = (weight, 0) if (weight, 0) in slots else None
    in_slot = (weight, 1) if (weight, 1) in slots else None
    bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.Linear):
        return LayerSpec(name, "linear", module.in_features, module.out_features, shape, (bias,), in_slot, out_slot)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and isinstance(module.padding, tuple):
        config = (len(module.kernel_size), tuple(module.kernel_size), tuple(module.stride), tuple(module.padding),
                  tuple(module.dilation), bias)
        depthwise = module.groups == module.in_channels == module.out_channels and module.groups > 1
        if module.groups == 1:
            return LayerSpec(name, "conv", module.in_channels, module.out_channels, shape, config, in_slot, out_slot)
        if depthwise and out_slot is not None:
            return LayerSpec(name, "conv", module.in_channels, module.out_channels, shape, config, None, out_slot,
                             tied=True)
    return None  # grouped convs, transposed convs, string padding: part of the rest


# Nodes that only re-describe memory (no work worth timing): left out of the rest's element count.
_VIEWS = {"reshape", "view", "permute", "transpose", "getitem", "getattr", "flatten", "unflatten", "unsqueeze",
          "squeeze", "expand", "size", "dim", "chunk", "split", "unbind", "narrow", "t", "detach"}


def element_weights(gm: fx.GraphModule, shapes: Dict[str, Any], coupling: Coupling,
                    layers: Set[str]) -> Tuple[np.ndarray, float]:
    """For the computing nodes outside the timed ``layers`` (module names): per unit id, how many of their output
    elements carry it (removing the unit removes them), and the number of all their output elements. A tensor
    whose two dims both shrink is counted once per dim (a small overcount of what goes)."""
    pieces, total = [], 0.0
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module") or _is_view(node) or \
                (node.op == "call_module" and node.target in layers):
            continue
        shape = shapes.get(node.name)
        if not isinstance(shape, tuple) or not all(isinstance(d, int) for d in shape):
            continue
        numel = float(np.prod(shape)) if shape else 1.0
        total += numel
        planes = coupling.node_units.get(node.name, ())
        for plane in (p for p in planes if isinstance(p, Plane)) if isinstance(planes, tuple) else ():
            arr = np.asarray(plane.arr, dtype=np.int64).ravel()
            if arr.size and arr.min() >= 0:
                pieces.append((arr, numel / arr.size))
    weights = np.zeros(max((int(a.max()) for a, _ in pieces), default=-1) + 1)
    for arr, share in pieces:
        np.add.at(weights, arr, share)
    if coupling.pinned < weights.size:
        weights[coupling.pinned] = 0.0  # never removed
    return weights, total


def _is_view(node: fx.Node) -> bool:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return node.op != "call_module" and target in _VIEWS


class LatencyModel:
    """Estimated seconds of a module after removing units: the layers' tables at their kept widths plus the rest.

    ``rest_seconds`` is the measured time not in any table (end to end minus the layers' dense times, at least 0);
    it scales with the kept fraction of ``elements`` = element_weights(...) (None: of all units alike)."""

    def __init__(self, coupling: Coupling, specs: Sequence[LayerSpec], tables: Dict[str, LayerTable],
                 rest_seconds: float, elements: Optional[Tuple[np.ndarray, float]] = None):
        self.specs = list(specs)
        self.elements = elements
        self.tables = [tables[s.signature()] for s in self.specs]
        self.rest = max(0.0, float(rest_seconds))
        self._slots = coupling.slot_units
        self._all_units = np.asarray(sorted(coupling.unit_group()), dtype=np.int64)
        self._top = int(max((int(u.max()) for u in self._slots.values() if u.size), default=0))

    def group_blocks(self, unit_group: Dict[int, str]) -> Dict[str, int]:
        """Per group id, the block its kept width should be a multiple of (latency_blocks.group_blocks over the
        tables' blocks and dense seconds; groups where channels inside a block still buy time are left out)."""
        dims = []
        for spec, table in zip(self.specs, self.tables):
            dense = table.at(spec.in_width, spec.out_width)
            for side, _, slot in spec.prunable_dims():
                dims.append((self._slots[slot], table.out_block if side == "out" else table.in_block, dense))
        return group_blocks(unit_group, dims)

    def layer_seconds(self) -> float:
        """The layers' dense seconds (their tables at full width)."""
        return sum(t.at(s.in_width, s.out_width) for s, t in zip(self.specs, self.tables))

    def estimate(self, removed: Set[int]) -> float:
        """Seconds with the ``removed`` units gone."""
        gone = np.zeros(max(self._top, max(removed, default=0)) + 1, dtype=bool)
        gone[list(removed)] = True
        total = 0.0
        for spec, table in zip(self.specs, self.tables):
            out_w = self._kept(spec.out_slot, spec.out_width, gone)
            in_w = out_w if spec.tied else self._kept(spec.in_slot, spec.in_width, gone)
            total += table.at(in_w, out_w)
        return total + self.rest * self._rest_kept(gone)

    def _rest_kept(self, gone: np.ndarray) -> float:
        """The kept fraction of the rest's work: of its output elements, or of all units without element counts."""
        if self.elements is None:
            return 1.0 - gone[self._all_units].mean() if self._all_units.size else 1.0
        weights, total = self.elements
        n = min(weights.size, gone.size)
        return max(0.0, 1.0 - float(weights[:n][gone[:n]].sum()) / total) if total > 0 else 1.0

    def _kept(self, slot: Optional[Slot], width: int, gone: np.ndarray) -> int:
        if slot is None:
            return width
        return int((~gone[self._slots[slot]]).sum())
