"""Verify: oracles that check a pruned module against the original.

Masking equivalence: run the ORIGINAL traced graph with every removed unit's positions zeroed after every node
(and its parameter slices zeroed); the pruned module must give the same output (exactly, up to float round-off).
A mean or a layer norm over a dim that lost positions computes over the kept positions only, as the pruned module
does (the residual stream of a transformer feeds RMSNorm's mean of squares and LayerNorm); other normalisations
over a pruned dim (BatchNorm in train mode, GroupNorm, softmax) still mix the zeroed positions in.
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
from .tensors import eval_mode, owner_and_attr


class _Masker(fx.Interpreter):
    """Interpreter that zeroes the positions of removed units in every intermediate value."""

    def __init__(self, gm: fx.GraphModule, coupling: Coupling, removed: Set[int]):
        super().__init__(gm)
        self.coupling = coupling
        self.removed = np.array(sorted(removed), dtype=np.int64)

    def run_node(self, n: fx.Node) -> Any:
        value = self._over_kept(n) if n.op == "call_function" and n.target in _KEPT_ONLY else None
        if value is None:
            value = super().run_node(n)
        if n.op in ("output", "placeholder"):
            return value
        return _mask(value, self.coupling.node_units.get(n.name, ()), self.removed)

    def _over_kept(self, n: fx.Node) -> Optional[torch.Tensor]:
        """A mean or layer norm over the last dim computed over the kept positions of its (masked) input only;
        None when its input lost no positions there (or lost different ones at different places)."""
        x_node = n.args[0]
        x = self.env.get(x_node) if isinstance(x_node, fx.Node) else None
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return None
        if _KEPT_ONLY[n.target] == "mean":
            dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            keepdim = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
            if not isinstance(dims, (list, tuple)) or len(dims) != 1 or dims[0] % x.dim() != x.dim() - 1:
                return None
        elif len(n.args[1]) != 1:  # layer_norm(x, normalized_shape, ...) over more than the last dim
            return None
        idx = _kept_last(self.coupling.node_units.get(x_node.name, ()), x.shape, self.removed)
        if idx is None:
            return None
        index = torch.as_tensor(idx, device=x.device)
        part = x.index_select(-1, index)
        if _KEPT_ONLY[n.target] == "mean":
            return part.mean(-1, keepdim=bool(keepdim))
        args = list(self.fetch_args_kwargs_from_env(n)[0]) + [None] * 5
        weight, bias = (None if t is None else t.index_select(0, index) for t in args[2:4])
        out = torch.zeros_like(x)
        out[..., index] = torch.nn.functional.layer_norm(part, (len(idx),), weight, bias, args[4] or 1e-5)
        return out


_KEPT_ONLY = {torch.ops.aten.mean.dim: "mean", torch.ops.aten.layer_norm.default: "layer_norm"}


def _kept_last(planes: Any, shape, removed: np.ndarray) -> Optional[np.ndarray]:
    """Kept positions along the last dim of a value with ``planes``, when some are removed and the same ones at
    every other coordinate; else None."""
    keep = _keep_mask(planes, removed)
    if keep is None:
        return None
    rows = np.broadcast_to(_broadcastable(keep, shape), tuple(shape)).reshape(-1, shape[-1])
    if not (rows == rows[:1]).all() or rows[0].all():
        return None
    return np.nonzero(rows[0])[0]


def _keep_mask(planes: Any, removed: np.ndarray) -> Optional[np.ndarray]:
    """Where a value with ``planes`` keeps its positions (a broadcastable bool array), or None if all stay."""
    keep = None
    for p in planes if isinstance(planes, tuple) else ():
        if isinstance(p, Plane):
            k = ~np.isin(p.arr, removed)
            if not k.all():
                keep = k if keep is None else keep & k
    return keep


def _broadcastable(keep: np.ndarray, shape) -> np.ndarray:
    """``keep`` reduced to size 1 on dims where it has the example's size but ``shape`` (another input's) differs
    and it does not vary: a plane may span a dim it is constant along (a reshape that inserts a size-1 dim groups
    it with its neighbours), which must not tie the mask to the example's sequence length."""
    for d, (k, n) in enumerate(zip(keep.shape, shape)):
        if k not in (1, n) and (keep == np.take(keep, [0], axis=d)).all():
            keep = np.take(keep, [0], axis=d)
    return keep


def _mask(value: Any, planes: Any, removed: np.ndarray) -> Any:
    if isinstance(value, torch.Tensor):
        keep = _keep_mask(planes, removed)
        if keep is None:
            return value
        keep = _broadcastable(keep, value.shape)
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
    with eval_mode(gm), torch.no_grad():
        zeroed = {f"gm.{name}": tensor for name, tensor in _zeroed(gm, plan).items()}
        runner = _MaskedRun(gm, coupling, removed)
        return functional_call(runner, zeroed, tuple(inputs if inputs is not None else traced.inputs),
                               strict=False, tie_weights=True)


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
