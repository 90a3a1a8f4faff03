"""Unstructured OBA: per-weight scores in, masks under one global threshold out (OBA.md section 3, last line).

Score of weight i in layer m: |mean_t s_t[i]| / max_m |mean_t s_t| + |θ_i| - the OBA score normalised per layer
by its maximum, plus the weight's magnitude, as in the authors' code; one global threshold over all weights.
"""
from __future__ import annotations

from typing import Dict

import torch

from .errors import ConfigError, ScoreError


def unstructured_scores(param_scores: Dict[str, torch.Tensor], params: Dict[str, torch.Tensor],
                        use_magnitude: bool = True) -> Dict[str, torch.Tensor]:
    """Per-weight scores: |s| normalised per layer by its max (+ |θ| when ``use_magnitude``)."""
    out = {}
    for name, s in param_scores.items():
        s = s.detach().abs().double()
        if not torch.isfinite(s).all():
            raise ScoreError(f"scores of '{name}' hold NaN/inf. What to do: check the calibration data and loss.")
        top = s.max()
        s = s / top if top > 0 else s
        out[name] = s + params[name].detach().abs().double() if use_magnitude else s
    return out


def global_masks(scores: Dict[str, torch.Tensor], sparsity: float) -> Dict[str, torch.Tensor]:
    """Keep-masks (True = keep) removing the ``sparsity`` fraction of lowest-scored weights over all layers."""
    if not (0.0 <= sparsity < 1.0):
        raise ConfigError(f"sparsity={sparsity} is outside [0, 1). What to do: pass the fraction of weights to zero.")
    if not scores:
        raise ConfigError("no prunable weights to score. What to do: the model needs Conv/Linear layers.")
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    k = int(round(sparsity * flat.numel()))
    if k == 0:
        return {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
    order = torch.argsort(flat, stable=True)  # ties broken by position: deterministic
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = False
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = keep[start:start + s.numel()].reshape(s.shape)
        start += s.numel()
    return masks


def apply_masks(module: torch.nn.Module, masks: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Zero the masked weights of ``module`` in place (a private copy); returns each tensor's sparsity."""
    params = dict(module.named_parameters())
    sparsity = {}
    with torch.no_grad():
        for name, keep in masks.items():
            p = params[name]
            p.mul_(keep.to(device=p.device, dtype=p.dtype))
            sparsity[name] = float(1.0 - keep.double().mean())
    return sparsity
