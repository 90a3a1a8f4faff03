"""The zoo benchmark's Torch-Pruning half: MetaPruner aimed at half the MACs, and the masking oracle applied to the
channels it removed (decoded from the pruned tensors and mapped onto obafx's coupled units)."""
from __future__ import annotations

import copy
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from obafx.passes.macs import thop_macs
from obafx.passes.plan import plan_from_removed
from obafx.passes.verify import masked_output

from zoo_common import MAC_TOL, TARGET, analyse, exact_tol, norm_owners, rel_err


def final_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The final classifier: the last Linear/Conv module in definition order."""
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.modules.conv._ConvNd))]
    return layers[-1]


def tp_prune(model: torch.nn.Module, x: torch.Tensor, ratio: float) -> Tuple[torch.nn.Module, float, float]:
    """A copy of ``model`` pruned one-shot by MetaPruner at channel ``ratio``; (copy, MACs, params) by TP."""
    import torch_pruning as tp

    m = copy.deepcopy(model)
    pruner = tp.pruner.MetaPruner(m, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
                                  ignored_layers=[final_layer(m)], global_pruning=False)
    pruner.step()
    macs, params = tp.utils.count_ops_and_params(m, x)
    return m, macs, params


def run_tp(model: torch.nn.Module, x: torch.Tensor, tries: int = 5) -> Dict[str, Any]:
    """MetaPruner aimed at half the MACs: the channel ratio is searched (MACs ~ (1-ratio)^a, a fitted from each
    try) until TP's own count lands in [0.49, 0.5]; the closest try at or below half is kept."""
    import torch_pruning as tp

    r: Dict[str, Any] = {"times_s": {}}
    base_macs, base_params = tp.utils.count_ops_and_params(model, x)
    t0 = time.perf_counter()
    ratio, best, tried = 1 - TARGET ** 0.5, None, []
    for _ in range(tries):
        m, macs, params = tp_prune(model, x, ratio)
        tried.append((round(ratio, 4), macs / base_macs))
        if macs <= base_macs * TARGET and (best is None or macs > best[1]):
            best = (m, macs, params, ratio)
        if abs(macs / base_macs / TARGET - 1) <= MAC_TOL and macs <= base_macs * TARGET:
            break
        a = np.log(max(macs / base_macs, 1e-6)) / np.log(1 - ratio) if 0 < macs < base_macs else 2.0
        ratio = float(np.clip(1 - (TARGET * (1 - MAC_TOL / 2)) ** (1 / max(a, 0.2)), 0.01, 0.95))
    m, macs, params, ratio = best if best is not None else (m, macs, params, ratio)
    r["times_s"]["prune"] = time.perf_counter() - t0
    with torch.no_grad():
        y0, y1 = model(x), m(x)
    r.update(pruning_ratio=ratio, tries=tried, macs_ratio_tp=macs / base_macs, params_ratio=params / base_params,
             macs_ratio=thop_macs(m, (x,))[0] / thop_macs(model, (x,))[0], shape_ok=tuple(y0.shape) == tuple(y1.shape))
    t1 = time.perf_counter()
    r["masked"] = tp_masked(model, m, x, y1)
    r["times_s"]["checks"] = time.perf_counter() - t1
    why = [] if r["shape_ok"] else ["output shape changed"]
    if r["macs_ratio_tp"] > TARGET * (1 + MAC_TOL):
        why.append(f"MACs ratio {r['macs_ratio_tp']:.4f} after tries {tried}")
    r["status"], r["why"] = ("fail", "; ".join(why)) if why else ("pass", "")
    return r


def decode_kept(orig: torch.Tensor, pruned: torch.Tensor) -> Optional[List[np.ndarray]]:
    """Kept indices per dim of ``pruned`` = ``orig`` sub-indexed on every dim (values must be distinct); None
    if it cannot be decoded."""
    o, p = orig.detach().cpu().numpy(), pruned.detach().cpu().numpy()
    if o.shape == p.shape:
        return [np.arange(s) for s in o.shape]
    if p.ndim != o.ndim or p.size == 0:
        return None
    hits = np.argwhere(o == p.flat[0])
    if len(hits) != 1:
        return None
    anchor, kept = hits[0], []
    for d in range(o.ndim):
        line_o = o[tuple(slice(None) if e == d else anchor[e] for e in range(o.ndim))]
        line_p = p[tuple(slice(None) if e == d else 0 for e in range(o.ndim))]
        if np.unique(line_o).size < line_o.size:  # repeated values: positions are ambiguous
            return None
        order = np.argsort(line_o)
        pos = np.searchsorted(line_o, line_p, sorter=order)
        idx = order[np.clip(pos, 0, len(order) - 1)]
        if not np.array_equal(line_o[idx], line_p):
            return None
        kept.append(idx)
    return kept


def tp_masked(original: torch.nn.Module, pruned: torch.nn.Module, x: torch.Tensor, y1) -> Dict[str, Any]:
    """Map Torch-Pruning's removals onto obafx's units (an index of a tensor obafx couples to others); then the
    masking oracle against TP's output. ``inconsistent``: units TP removed from some of their tensors but kept in
    others (its network then computes no masking of the original); ``disagree``: tensor shapes TP chose that
    obafx's coupling would not give."""
    traced, _, coupling = analyse(original, x)
    after, before = ({**dict(m.named_parameters()), **dict(m.named_buffers())} for m in (pruned, original))
    removed, kept_any, decoded = set(), set(), 0
    for (name, dim), units in coupling.slot_units.items():
        kept = decode_kept(before[name], after[name]) if name in after and name in before else None
        if kept is not None:  # undecodable tensors (repeated values) are checked by shape below
            decoded += 1
            removed.update(np.unique(np.delete(units, kept[dim])).tolist())
            kept_any.update(np.unique(units[kept[dim]]).tolist())
    r: Dict[str, Any] = {"slots_decoded": decoded, "inconsistent": len(removed & kept_any), "ok": False}
    if r["inconsistent"] or coupling.pinned in removed:
        r["why"] = (f"TP removed {r['inconsistent']} channels from some of the tensors that carry them and kept them "
                    "in others" if r["inconsistent"] else "TP removes channels obafx must keep")
        return r
    predicted, disagree = plan_from_removed(coupling, removed).kept, []
    for name, t in ((n, t) for n, t in after.items() if n in before):  # every shape as obafx would prune it
        want = list(before[name].shape)
        for d, idx in predicted.get(name, {}).items():
            want[d] = len(idx)
        if tuple(want) != tuple(t.shape):
            disagree.append(f"{name}: TP {tuple(t.shape)}, obafx's coupling {tuple(want)}")
    if disagree:
        return {**r, "why": "coupling disagrees: " + "; ".join(disagree[:5]), "disagree": len(disagree)}
    with torch.no_grad():
        err = rel_err(masked_output(traced, coupling, removed), y1)
    owners = norm_owners(traced.gm)
    norm = any(coupling.slot_roles[(name, d)][1] in owners or name.rpartition(".")[0] in owners
               for name, dims in predicted.items() for d in dims)
    exact = err < exact_tol(x)
    return {**r, "ok": True if exact else (None if norm else False), "error": err,
            "oracle": "exact" if exact else ("inexact-norm" if norm else "broken")}
