"""Torch-Pruning's own pruner and criteria (Taylor, fixed Hessian) on the accuracy benchmark's protocol.

Used by benchmarks/accuracy.py. Torch-Pruning's MetaPruner takes a channel ratio, not a MAC budget, so each budget
is reached by its own iterative run (its linear channel schedule over ``steps`` steps, global ranking), with the
ratio found for magnitude and then corrected from the measured MACs. Between steps the BatchNorm statistics are
recalibrated on that step's calibration batches, as obafx does between its steps.
"""
from __future__ import annotations

import copy
from typing import Callable, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from obafx.bench.models import Attention
from obafx.passes.macs import thop_macs

TP_METHODS = ("tp_taylor", "tp_hessian")
TP_TRIES = 2  # full Torch-Pruning runs allowed to land its MACs within 2% of the target (the closest is kept)
TP_HESSIAN_NOTE = ("per-sample squared gradients accumulated over every calibration sample (Torch-Pruning "
                   "1.6.1's accumulate_grad keeps only the last)")
TP_VIT_NOTE = ("on vit_tiny, Torch-Pruning's rows keep the qkv layers' width (ignored_layers): its pruner raises "
               "IndexError on the qkv reshape into heads, with or without num_heads=")


def _classifier(model) -> torch.nn.Module:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]


class _FixedHessian:
    """Torch-Pruning's GroupHessianImportance with per-sample squared gradients accumulated over all samples."""

    @staticmethod
    def make():
        import torch_pruning as tp

        class Fixed(tp.importance.GroupHessianImportance):
            def accumulate_grad(self, model):
                for _, param in model.named_parameters():
                    if param.grad is not None:
                        sq = param.grad.detach().clone().pow(2)
                        self._accu_grad[param] = self._accu_grad.get(param, 0) + sq
                        self._counter[param] = self._counter.get(param, 0) + 1
        return Fixed()


def prune_tp(model, example, method: str, keep: float, batches: List, steps: int, seed: int,
             recalibrate: Optional[Callable] = None):
    """Torch-Pruning's MetaPruner with its own criterion, iterative, toward ``keep`` of the MACs (global ranking).

    In: dense model (not modified), example input, method ("tp_taylor" | "tp_hessian"), MAC fraction to keep,
    ``steps * k`` calibration batches (k per step), steps, seed, recalibrate(model, batches) run after every step.
    Out: (pruned model, MAC fraction reached). The ratio is first found for magnitude (cheap), then corrected from
    each full run (MACs ~ (1 - ratio)^a) until the MACs (thop) are within 2% of the target, at most ``TP_TRIES``
    full runs. TP's own counter also counts attention matmuls, so on the ViT it would stop at a different budget."""
    base, _ = thop_macs(model, (example,))
    ratio, best = _tp_ratio_for(model, example, keep, base), None
    for _ in range(TP_TRIES):
        pruned = _tp_run(model, example, method, ratio, batches, steps, seed, recalibrate)
        kept = thop_macs(pruned, (example,))[0] / base
        if best is None or abs(kept - keep) < abs(best[1] - keep):
            best = (pruned, kept)
        if abs(kept / keep - 1) <= 0.02 or not 0 < kept < 1:
            break
        a = np.log(kept) / np.log(1 - ratio)
        ratio = float(np.clip(1 - keep ** (1 / max(a, 0.2)), 0.01, 0.95))
    return best


def _tp_run(model, example, method: str, ratio: float, batches: List, steps: int, seed: int, recalibrate):
    """One iterative MetaPruner run at channel ``ratio`` with Torch-Pruning's Taylor or (fixed) Hessian criterion."""
    import torch_pruning as tp

    torch.manual_seed(seed)
    model = copy.deepcopy(model).eval()
    imp = tp.importance.GroupTaylorImportance() if method == "tp_taylor" else _FixedHessian.make()
    pruner = tp.pruner.MetaPruner(model, example, importance=imp, pruning_ratio=ratio, iterative_steps=steps,
                                  ignored_layers=_tp_ignored(model), global_pruning=True)
    per = max(1, len(batches) // steps)
    for s in range(steps):
        chunk = batches[s * per:(s + 1) * per]
        model.zero_grad()
        if method == "tp_taylor":
            for x, y in chunk:
                (F.cross_entropy(model(x), y) / len(chunk)).backward()
        else:
            imp.zero_grad()
            for x, y in chunk:
                _accumulate_per_sample(model, imp, x, y)
        pruner.step()
        if recalibrate is not None:
            recalibrate(model, chunk)
    model.zero_grad(set_to_none=True)
    return model.eval()


def _accumulate_per_sample(model, imp, x, y) -> None:
    """What the fixed accumulate_grad gathers from one backward per sample (its docs require per-sample gradients),
    computed for the whole batch at once with torch.func (vmap of grad): the sum over samples of each parameter's
    squared per-sample gradient, and the sample count it is divided by. It also leaves ``.grad`` set, as
    Torch-Pruning's importance expects some gradient to overwrite."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, (p, buffers), (xi[None],)), yi[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for name, param in model.named_parameters():
        sq = grads[name].pow(2).sum(0)
        imp._accu_grad[param] = imp._accu_grad.get(param, 0) + sq
        imp._counter[param] = imp._counter.get(param, 0) + len(x)
        param.grad = grads[name].mean(0)


def _tp_ignored(model) -> List[torch.nn.Module]:
    """What Torch-Pruning must leave alone: the classifier, and the ViT's qkv layers. On qkv reshaped into heads
    (``reshape(B, N, 3, -1, head_dim)``) its pruner raises IndexError, with or without ``num_heads=`` (head dims or
    whole heads); keeping qkv's width is the workaround, so TP prunes the MLPs and the residual stream there."""
    return [_classifier(model)] + [m.qkv for m in model.modules() if isinstance(m, Attention)]


def _tp_ratio_for(model, example, keep: float, base: float) -> float:
    """The channel ratio at which Torch-Pruning's magnitude pruner keeps ``keep`` of the MACs (bisection)."""
    import torch_pruning as tp

    lo, hi = 0.0, 0.95
    for _ in range(8):
        mid = (lo + hi) / 2
        m = copy.deepcopy(model)
        tp.pruner.MetaPruner(m, example, importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=mid,
                             ignored_layers=_tp_ignored(m), global_pruning=True).step()
        macs, _ = thop_macs(m, (example,))
        lo, hi = (mid, hi) if macs > keep * base else (lo, mid)
    return hi
