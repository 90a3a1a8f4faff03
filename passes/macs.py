"""MACs and parameter counts: thop on the real module, and a fast per-layer estimate for selection.

thop counts what module hooks see (conv, linear, norms, pooling); functional matmuls, attention inside
nn.MultiheadAttention and every op of a torch.export graph (no submodules) are invisible to it. `flop_macs` counts
with torch.utils.flop_counter's FlopCounterMode instead (compile_prune(counter="flops"), the default on exported
graphs), per layer as thop does.
"""
from __future__ import annotations

import contextlib
import io
from typing import Any, Dict, Optional, Set, Tuple

import numpy as np
import thop
import torch
import torch.fx as fx
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import ConfigError
from .facts import Coupling
from .private_copy import private_copy
from .tensors import eval_mode


def thop_macs(model: nn.Module, inputs: Tuple[Any, ...]) -> Tuple[float, Dict[str, float]]:
    """Total MACs (thop) of ``model`` on ``inputs`` and the MACs of each leaf module by qualified name.

    thop registers buffers and hooks, so it runs on a private copy (tensors copied only if written: thop
    runs the copy once in eval mode); the model is left untouched.
    """
    private = private_copy(model)
    with contextlib.redirect_stdout(io.StringIO()):  # thop prints registration notes
        total, _, tree = thop.profile(private, inputs=tuple(inputs), verbose=False, ret_layer_info=True)
    per_module: Dict[str, float] = {}
    _flatten(tree, "", per_module)
    return float(total), per_module


def _flatten(tree: Dict[str, Any], prefix: str, out: Dict[str, float]) -> None:
    """thop's nested {child: (ops, params, subtree)} as {qualified name: ops} for modules without children."""
    for name, (ops, _, sub) in tree.items():
        qual = f"{prefix}{name}"
        if sub:
            _flatten(sub, qual + ".", out)
        else:
            out[qual] = float(ops)


def flop_counter_macs(model: nn.Module, inputs: Tuple[Any, ...]) -> float:
    """MACs seen by torch's dispatcher-level FlopCounterMode (FLOPs / 2), functional matmuls included.

    Runs with autograd enabled: under no_grad, nn.MultiheadAttention takes a fused fast path that FlopCounterMode
    does not count."""
    with eval_mode(model), torch.enable_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops() / 2.0


class _NodeFlops(fx.Interpreter):
    """Runs a graph under one FlopCounterMode and charges each node's FLOPs to the layer it applies: a submodule
    (call_module: its qualified name) or the owner of a get_attr ``*.weight`` argument (aten.linear, addmm, conv:
    'model.layers.0.mlp.up_proj'); anything else is charged to the node itself."""

    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode):
        super().__init__(gm)
        self.counter = counter
        self.per_layer: Dict[str, float] = {}

    def run_node(self, n: fx.Node) -> Any:
        before = self.counter.get_total_flops()
        value = super().run_node(n)
        flops = self.counter.get_total_flops() - before
        if flops:
            key = _layer_key(n)
            self.per_layer[key] = self.per_layer.get(key, 0.0) + flops / 2.0
        return value


def _layer_key(n: fx.Node) -> str:
    if n.op == "call_module":
        return n.target
    for a in n.all_input_nodes:
        if a.op == "get_attr" and a.target.endswith(".weight"):
            return a.target.rpartition(".")[0]
    return n.name


def flop_macs(gm: fx.GraphModule, inputs: Tuple[Any, ...]) -> Tuple[float, Dict[str, float]]:
    """Total MACs (FlopCounterMode's FLOPs / 2: every dispatched matmul, convolution and attention) of ``gm`` on
    ``inputs``, and the MACs of each layer it applies (see `_NodeFlops`), in the same form as `thop_macs`. The
    graph runs once in eval mode, with autograd enabled (see `flop_counter_macs`)."""
    with eval_mode(gm), torch.enable_grad(), FlopCounterMode(display=False) as counter:
        runner = _NodeFlops(gm, counter)
        runner.run(*inputs)
    return counter.get_total_flops() / 2.0, runner.per_layer


def counter_name(counter: Optional[str], capture: str) -> str:
    """The MAC counter to use: ``counter`` ("thop" or "flops"; ConfigError otherwise), or by default thop on an
    fx graph and FlopCounterMode on an exported one (``capture``), where thop's module hooks see nothing."""
    if counter is None:
        return "flops" if capture == "export" else "thop"
    if counter not in ("thop", "flops"):
        raise ConfigError(f"counter={counter!r}. What to do: use 'thop' (module hooks) or 'flops' (torch's "
                          "FlopCounterMode), or leave it out.")
    return counter


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class MacModel:
    """Estimate MACs after removing units: each module's thop MACs scale with the kept fraction of every one
    of its parameter slots (in and out channels). Exact for conv/linear; corrected by a thop measurement."""

    def __init__(self, coupling: Coupling, per_module: Dict[str, float]):
        self.fixed = 0.0
        macs, slots = [], []  # per module with weight slots: its MACs, and the unit arrays of those slots
        by_owner: Dict[str, list] = {}
        for (name, dim), units in coupling.slot_units.items():
            owner = name.rpartition(".")[0]
            if name.endswith(".weight") or name.endswith("in_proj_weight") or name.endswith("running_mean"):
                by_owner.setdefault(owner, []).append(units)
        for module, ops in per_module.items():
            if module in by_owner:
                macs.append(ops)
                slots.append(by_owner[module])
            else:
                self.fixed += ops
        # All slots' units in one array, so that an estimate is a handful of vectorised steps (select calls it
        # once per bisection step, on models with hundreds of layers).
        lengths = [len(u) for group in slots for u in group]
        self._macs = np.asarray(macs, dtype=np.float64)
        self._units = np.concatenate([u for group in slots for u in group]) if lengths else np.zeros(0, np.int64)
        self._starts = np.cumsum([0] + lengths[:-1]).astype(np.int64)
        self._lengths = np.asarray(lengths, dtype=np.float64)
        self._module_of_slot = np.repeat(np.arange(len(slots)), [len(group) for group in slots])

    def savings(self, units) -> Dict[int, float]:
        """Unit -> MACs saved by removing that unit alone (for each of ``units``): per module, its MACs times
        (1 - the product over its slots of the kept fraction), the rule of `estimate` one unit at a time."""
        units = np.asarray(list(units), dtype=np.int64)
        if not units.size or not self._macs.size:
            return {int(u): 0.0 for u in units}
        size = int(max(units.max(), self._units.max())) + 1
        saved = np.zeros(size)
        ends = self._starts + self._lengths.astype(np.int64)
        for m, ops in enumerate(self._macs):  # one pass per module; units outside it keep a product of 1
            kept = np.ones(size)
            for s in np.flatnonzero(self._module_of_slot == m):
                slot = self._units[self._starts[s]:ends[s]]
                kept *= 1.0 - np.bincount(slot, minlength=size) / self._lengths[s]
            saved += ops * (1.0 - kept)
        return {int(u): float(saved[u]) for u in units}

    def estimate(self, removed: Set[int]) -> float:
        """MACs with the ``removed`` units gone: per module, its MACs times the kept fraction of each slot."""
        if not self._macs.size:
            return self.fixed
        gone = np.zeros(max(int(self._units.max()), max(removed, default=0)) + 1, dtype=bool)
        gone[list(removed)] = True
        kept = np.add.reduceat(~gone[self._units], self._starts) / self._lengths
        scale = np.ones(self._macs.size)
        np.multiply.at(scale, self._module_of_slot, kept)
        return self.fixed + float(scale @ self._macs)
