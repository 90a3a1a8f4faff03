"""Per-parameter OBA scores s = θ ⊙ (Hθ) (OBA.md section 1), computed with Hessian-vector products.

One HVP per batch gives Hθ for every prunable parameter at once (θ = all prunable weights and biases,
perturbed together). Two readings of H:

- ``mode="full"``: H is the exact Hessian of the loss. Computed by forward-over-reverse (``torch.func.jvp`` of
  a ``torch.func.vjp``), falling back to double backward when forward-mode AD is missing.
- ``mode="residual"``: H − G with G = Jᵀ H_ℓ J the Gauss-Newton part. Since H − G = Σ_k r_k ∇²f_k with
  r = ∂ℓ/∂f (the loss gradient w.r.t. the network output f), (H − G)θ is the directional derivative of
  θ ↦ J(θ)ᵀ r along θ *with r held fixed*. That is one forward plus one forward-over-reverse pass: cheaper
  than computing Hθ and Gθ separately and subtracting, and exactly equal to it.

The user's model is never modified: parameters enter ``torch.func.functional_call`` as detached views,
buffers as clones, training flags are restored, ``.grad`` is never written. The shared machinery (batches,
functional setup, averaging) is in scoring.py, used alike by criteria.py and group_scores.py.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch.nn as nn

from .errors import ConfigError
from .facts import DEFAULT_MODE
from .hvp_kernels import grad_and_hvp
from .scoring import (MHA_PARAMETERS, PRUNABLE_TYPES, Scores, accumulate, chunked,  # noqa: F401 (re-exported)
                      prunable_parameter_names, scoring)

__all__ = ["parameter_scores", "prunable_parameter_names", "PRUNABLE_TYPES", "MHA_PARAMETERS", "DEFAULT_MODE"]

# DEFAULT_MODE (the OBA mode used wherever none is given) is part of the vocabulary in facts.py.


# ------------------------------------------------------------------------------------------------ public

def parameter_scores(model: nn.Module, batches: Iterable, loss_fn: Optional[Callable] = None,
                     mode: str = DEFAULT_MODE,
                     delta: float = 0.0, train: bool = False, params: Optional[Iterable[str]] = None,
                     chunk_size: Optional[int] = None, progress: bool = False, *,
                     _backend: Optional[str] = None) -> Scores:
    """OBA scores of every prunable parameter: s = θ ⊙ (Mθ) + delta · θ ⊙ g, averaged over batches.

    In:
      model: float32/float64 ``nn.Module``; never modified (parameters, buffers, training flags, ``.grad``).
      batches: iterable of ``(inputs, targets)`` (inputs a tensor or tuple of tensors), or of bare inputs;
        bare inputs (or targets None) are scored against the model's own argmax predictions (with a warning).
      loss_fn: ``loss_fn(output, targets) -> scalar`` (default ``F.cross_entropy``), a mean over samples.
      mode: "full": M = H, the exact loss Hessian; "residual": M = H − G, G = Jᵀ H_ℓ J the Gauss-Newton part.
      delta: weight of the first-order term θ ⊙ g (g the loss gradient). OBA drops it (delta=0). Removing θ
        changes the loss by ΔL ≈ −gᵀθ + ½ θᵀHθ, so delta=−2 makes ½ Σ s the second-order estimate of ΔL.
      train: score in train mode (BatchNorm on batch statistics, dropout active); default eval mode.
      params: names to score (default ``prunable_parameter_names(model)``); θ = all of them, perturbed together.
      chunk_size: split batches larger than this into chunks whose HVPs are combined with weights
        chunk / batch size: exact for a mean-reduced loss in eval mode, and peak memory follows the chunk.
        Refused with train=True on models with BatchNorm (batch statistics would change).
      progress: show a tqdm bar over batches.
    Out: name -> tensor shaped like the parameter: the mean over batches (equal weights) of per-batch scores.
    Raises ConfigError (half precision, device/dtype mismatch, bad names), ScoreError (non-scalar loss,
    NaN/inf scores, empty batches).
    """
    if mode not in ("full", "residual"):
        raise ConfigError(f"mode={mode!r}. What to do: use mode='full' (loss Hessian) or 'residual' (H - G)")
    with scoring(model, params, loss_fn, train, chunk_size) as setup:
        def per_batch(args, targets):
            g, mv = chunked(setup, args, targets, chunk_size,
                             lambda a, t: grad_and_hvp(setup, a, t, setup.theta, mode, _backend))
            return {n: th * mv[n] + (delta * th * g[n] if delta else 0.0) for n, th in setup.theta.items()}
        return accumulate(setup, batches, per_batch, progress, f"OBA {mode} scores")
