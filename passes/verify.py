"""Verify: oracles that check a pruned module against the original.

Masking equivalence: run the ORIGINAL traced graph with every removed unit's positions zeroed after every node
(and its parameter slices zeroed); the pruned module must give the same output (exactly, up to float round-off, wherever no normalisation or mean
mixes the pruned channels).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Set

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.func import functional_call

from .facts import Coupling, PrunePlan, Traced
from .labels import Plane
from .plan import plan_from_removed
from .tensors import owner_and_attr


class _Masker(fx.Interpreter):
    """Interpreter that zeroes the positions of removed units in every intermediate value."""

    def __init__(self, gm: fx.GraphModule, coupling: Coupling, removed: Set[int]):
        super().__init__(gm)
        self.coupling = coupling
        self.removed = np.array(sorted(removed), dtype=np.int64)

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.op in ("output", "placeholder"):
            return value
        return _mask(value, self.coupling.node_units.get(n.name, ()), self.removed)


def _mask(value: Any, planes: Any, removed: np.ndarray) -> Any:
    if isinstance(value, torch.Tensor):
        keep = None
        for p in planes if isinstance(planes, tuple) else ():
            if isinstance(p, Plane):
                k = ~np.isin(p.arr, removed)
                if not k.all():
                    keep = k if keep is None else keep & k
        if keep is None:
            return value
        mask = torch.from_numpy(np.ascontiguousarray(keep)).to(device=value.device)
        return torch.where(mask, value, torch.zeros((), dtype=value.dtype, device=value.device))
    if isinstance(value, (tuple, list)) and isinstance(planes, tuple) and len(planes) == len(value):
        masked = [_mask(v, p, removed) for v, p in zip(value, planes)]
        return type(value)(masked) if isinstance(value, list) else tuple(masked)
    return value


def masked_output(traced: Traced, coupling: Coupling, removed: Set[int], inputs=None,
                  plan: Optional[PrunePlan] = None) -> Any:
    """The original model's output with every removed unit zeroed everywhere (eval mode, no grad): in every
    intermediate value and in every parameter and buffer slice, so that the insides of opaque layers agree too
    (a MultiheadAttention's removed heads contribute nothing). Nothing is written into ``traced``: the zeroed
    parameters are new tensors (only those that lose slices) swapped in for the run by
    ``torch.func.functional_call``, on every device alike. ``plan``: the plan of ``removed``, when the caller
    has it already."""
    plan = plan if plan is not None else plan_from_removed(coupling, removed)
    gm = traced.gm
    was = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            zeroed = {f"gm.{name}": tensor for name, tensor in _zeroed(gm, plan).items()}
            runner = _MaskedRun(gm, coupling, removed)
            return functional_call(runner, zeroed, tuple(inputs if inputs is not None else traced.inputs),
                                   strict=False, tie_weights=True)
    finally:
        gm.train(was)


class _MaskedRun(nn.Module):
    """``gm``'s graph run by the masking interpreter, as a module (so functional_call can swap its tensors)."""

    def __init__(self, gm: fx.GraphModule, coupling: Coupling, removed: Set[int]):
        super().__init__()
        self.gm = gm
        self.coupling, self.removed = coupling, removed

    def forward(self, *args):
        return _Masker(self.gm, self.coupling, self.removed).run(*args)


def _zeroed(gm: fx.GraphModule, plan: PrunePlan) -> Dict[str, torch.Tensor]:
    """{qualified name: a new tensor equal to that parameter or buffer with the plan's removed slices zeroed},
    for every tensor the plan changes (out of place: ``gm`` keeps its values)."""
    out: Dict[str, torch.Tensor] = {}
    for name, dims in plan.kept.items():
        tensor = out.get(name, getattr(*owner_and_attr(gm, name)))
        for dim, kept in dims.items():
            gone = sorted(set(range(tensor.shape[dim])) - set(kept))
            index = torch.tensor(gone, dtype=torch.long, device=tensor.device)
            tensor = tensor.index_fill(dim, index, 0)
        out[name] = tensor
    return out


def max_relative_error(a: Any, b: Any) -> float:
    """Largest |a-b| / max|a| over (nested) tensor outputs."""
    if isinstance(a, torch.Tensor):
        scale = a.abs().max().clamp_min(1e-30)
        return float(((a - b).abs().max() / scale).item())
    if isinstance(a, (tuple, list)):
        return max((max_relative_error(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, dict):
        return max((max_relative_error(a[k], b[k]) for k in a), default=0.0)
    return 0.0
