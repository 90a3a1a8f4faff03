"""Verify: oracles that check a pruned module against the original.

Masking equivalence: run the ORIGINAL traced graph with every removed unit's positions zeroed after every node
(and its parameter slices zeroed); the pruned module must give the same output (exactly, up to float round-off, wherever no normalisation or mean
mixes the pruned channels).
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional, Set

import numpy as np
import torch
import torch.fx as fx

from .facts import Coupling, PrunePlan, Traced
from .labels import Plane
from .plan import plan_from_removed
from .private_copy import copies_lazily, private_copy
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
    (a MultiheadAttention's removed heads contribute nothing). ``traced`` is left as it was: the slices are
    zeroed in a copy-on-write copy (only the zeroed tensors get memory of their own), or, where tensors cannot
    be shared that way (other devices), in place and put back afterwards. ``plan``: the plan of ``removed``,
    when the caller has it already."""
    plan = plan if plan is not None else plan_from_removed(coupling, removed)
    in_place = not copies_lazily(traced.gm)
    gm = traced.gm if in_place else private_copy(traced.gm)
    was = gm.training
    gm.eval()
    try:
        with torch.no_grad(), _zeroed(gm, plan, restore=in_place):
            return _Masker(gm, coupling, removed).run(*(inputs if inputs is not None else traced.inputs))
    finally:
        gm.train(was)


@contextlib.contextmanager
def _zeroed(gm: fx.GraphModule, plan: PrunePlan, restore: bool):
    """Zero the removed slices of ``gm``'s parameters and buffers in place for the block; with ``restore``, put
    them back afterwards (a copy of a large model on an accelerator would double its memory)."""
    saved = []
    try:
        for name, dims in plan.kept.items():
            tensor = getattr(*owner_and_attr(gm, name))
            for dim, kept in dims.items():
                gone = sorted(set(range(tensor.shape[dim])) - set(kept))
                index = torch.tensor(gone, dtype=torch.long, device=tensor.device)
                if restore:
                    saved.append((tensor, dim, index, tensor.index_select(dim, index)))
                tensor.index_fill_(dim, index, 0)
        yield
    finally:
        for tensor, dim, index, values in reversed(saved):  # reversed: overlaps get their first values back
            tensor.index_copy_(dim, index, values)


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
