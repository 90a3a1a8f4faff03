"""Per-parameter baseline criteria (OBA.md section 5), with the same data and loss conventions as OBA scores.

Every function takes the ``batches`` / ``loss_fn`` / ``train`` / ``params`` / ``chunk_size`` / ``progress``
arguments of ``parameter_scores`` (see its docstring), leaves the model untouched, and returns a dict
parameter name -> tensor shaped like the parameter, averaged over batches with equal weights:

- ``taylor_scores``: θ ⊙ ḡ, signed (a group's score later takes |Σ|; Molchanov et al.).
- ``obd_scores``: ½ θ² · diag(H) (LeCun 1990), the diagonal exact (small models) or Hutchinson-estimated.
- ``fisher_scores``: ½ θ² · mean over samples of squared per-sample gradients (empirical Fisher diagonal, what
  Torch-Pruning calls its "Hessian" criterion; here every sample of every batch counts).
- ``magnitude_scores``: θ², so that a group's L2 norm is the square root of a sum.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.func import grad, vmap
from torch.nn.modules.batchnorm import _NormBase

from .errors import ConfigError
from .hvp_kernels import detached_leaves, grad_and_hvp
from .scoring import Scores, Setup, accumulate, chunked, resolve_names, scoring

__all__ = ["taylor_scores", "obd_scores", "fisher_scores", "magnitude_scores"]


def _gradient(setup: Setup, args: tuple, targets) -> Scores:
    """The loss gradient w.r.t. the scored parameters on one (chunk of a) batch, by plain reverse mode."""
    leaves = detached_leaves(setup.theta)
    with torch.enable_grad():
        loss = setup.loss(setup.forward(leaves, args), targets)
        got = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True, materialize_grads=True)
    return dict(zip(leaves, got))


def taylor_scores(model: nn.Module, batches: Iterable, loss_fn: Optional[Callable] = None, train: bool = False,
                  params: Optional[Iterable[str]] = None, chunk_size: Optional[int] = None,
                  progress: bool = False) -> Scores:
    """First-order Taylor scores θ ⊙ ḡ (ḡ: the loss gradient averaged over batches), signed."""
    with scoring(model, params, loss_fn, train, chunk_size) as setup:
        def per_batch(args, targets):
            (g,) = chunked(setup, args, targets, chunk_size, lambda a, t: (_gradient(setup, a, t),))
            return {n: th * g[n] for n, th in setup.theta.items()}
        return accumulate(setup, batches, per_batch, progress, "Taylor scores")


def obd_scores(model: nn.Module, batches: Iterable, loss_fn: Optional[Callable] = None,
               diagonal: str = "hutchinson", samples: int = 16, seed: int = 0, train: bool = False,
               params: Optional[Iterable[str]] = None, chunk_size: Optional[int] = None, progress: bool = False,
               max_exact_numel: int = 4096) -> Scores:
    """Optimal Brain Damage scores ½ θ² · diag(H), H the loss Hessian, averaged over batches.

    diagonal="exact": one HVP per parameter coordinate and batch (e_jᵀ H e_j), refused with ConfigError when
    the scored parameters hold more than ``max_exact_numel`` numbers. diagonal="hutchinson": the mean of
    z ⊙ Hz over ``samples`` Rademacher vectors z per batch, an unbiased estimate; the z are drawn from a
    CPU generator seeded with ``seed`` (reproducible on any device) and shared by a batch's chunks.
    """
    if diagonal not in ("hutchinson", "exact"):
        raise ConfigError(f"diagonal={diagonal!r}. What to do: use 'hutchinson' or 'exact'")
    if diagonal == "hutchinson" and (not isinstance(samples, int) or samples < 1):
        raise ConfigError(f"samples={samples!r}. What to do: pass a positive number of Hutchinson probes")
    with scoring(model, params, loss_fn, train, chunk_size) as setup:
        total = sum(t.numel() for t in setup.theta.values())
        if diagonal == "exact" and total > max_exact_numel:
            raise ConfigError(f"an exact Hessian diagonal needs one HVP per coordinate: {total} here, over "
                              f"max_exact_numel={max_exact_numel}. What to do: use diagonal='hutchinson', "
                              f"score fewer params=[...], or raise max_exact_numel if you can wait")
        generator = torch.Generator().manual_seed(seed)
        estimate = _exact_diagonal if diagonal == "exact" else _hutchinson_diagonal

        def per_batch(args, targets):
            diag = estimate(setup, args, targets, chunk_size, samples, generator)
            return {n: 0.5 * th * th * diag[n] for n, th in setup.theta.items()}
        return accumulate(setup, batches, per_batch, progress, f"OBD ({diagonal}) scores")


def _hessian_times(setup: Setup, args, targets, chunk_size, vec: Scores) -> Scores:
    """H · vec on one batch (chunked like the OBA scores)."""
    (hv,) = chunked(setup, args, targets, chunk_size, lambda a, t: (grad_and_hvp(setup, a, t, vec)[1],))
    return hv


def _exact_diagonal(setup: Setup, args, targets, chunk_size, samples, generator) -> Scores:
    """diag(H) coordinate by coordinate: (H e_j)_j for every scored coordinate j."""
    diag = {n: torch.zeros_like(t) for n, t in setup.theta.items()}
    for name, theta in setup.theta.items():
        for j in range(theta.numel()):
            vec = {n: torch.zeros_like(t) for n, t in setup.theta.items()}
            vec[name].view(-1)[j] = 1.0
            diag[name].view(-1)[j] = _hessian_times(setup, args, targets, chunk_size, vec)[name].view(-1)[j]
    return diag


def _hutchinson_diagonal(setup: Setup, args, targets, chunk_size, samples, generator) -> Scores:
    """mean over ``samples`` Rademacher z of z ⊙ Hz (E[z ⊙ Hz] = diag(H) since E[z zᵀ] = I)."""
    diag = {n: torch.zeros_like(t) for n, t in setup.theta.items()}
    for _ in range(samples):
        z = {n: (torch.randint(0, 2, t.shape, generator=generator) * 2 - 1).to(t.device, t.dtype)
             for n, t in setup.theta.items()}
        hz = _hessian_times(setup, args, targets, chunk_size, z)
        for n in diag:
            diag[n] += z[n] * hz[n] / samples
    return diag


def fisher_scores(model: nn.Module, batches: Iterable, loss_fn: Optional[Callable] = None, train: bool = False,
                  params: Optional[Iterable[str]] = None, chunk_size: Optional[int] = None,
                  progress: bool = False) -> Scores:
    """Empirical-Fisher OBD scores ½ θ² · mean over a batch's samples of (∂ℓ_i/∂θ)², averaged over batches.

    Per-sample gradients come from ``torch.func.vmap(grad)`` (a per-sample loop where vmap cannot run the
    model); ``chunk_size`` bounds how many samples are vmapped at once. Refused in train mode on models with
    BatchNorm: a single sample has no batch statistics, so its gradient is not defined.
    """
    if train and any(isinstance(m, _NormBase) for m in model.modules()):
        raise ConfigError("per-sample gradients are undefined with BatchNorm in train mode (a sample alone has "
                          "no batch statistics). What to do: use train=False (BatchNorm on running stats)")
    with scoring(model, params, loss_fn, train, chunk_size) as setup:
        def per_batch(args, targets):
            (sq,) = chunked(setup, args, targets, chunk_size, lambda a, t: (_mean_squared_grads(setup, a, t),))
            return {n: 0.5 * th * th * sq[n] for n, th in setup.theta.items()}
        return accumulate(setup, batches, per_batch, progress, "Fisher scores")


def _mean_squared_grads(setup: Setup, args: tuple, targets: Tensor) -> Scores:
    """mean over the samples of ``args`` of the squared per-sample loss gradient."""
    def sample_loss(theta, sample_args, target):
        batch_of_one = tuple(a.unsqueeze(0) for a in sample_args)
        return setup.loss(setup.forward(theta, batch_of_one), target.unsqueeze(0))
    try:
        per = vmap(grad(sample_loss), in_dims=(None, 0, 0))(setup.theta, args, targets)
        return {n: (g * g).mean(0) for n, g in per.items()}
    except (RuntimeError, NotImplementedError, ValueError):  # ops without batching rules, non-tensor args
        return _looped_squared_grads(setup, args, targets)


def _looped_squared_grads(setup: Setup, args: tuple, targets: Tensor) -> Scores:
    """The same mean of squared per-sample gradients, one sample at a time (slow, works on any model)."""
    n = targets.shape[0]
    total = {name: torch.zeros_like(t) for name, t in setup.theta.items()}
    for i in range(n):
        one = tuple(a[i:i + 1] if isinstance(a, Tensor) and a.dim() > 0 else a for a in args)
        g = _gradient(setup, one, targets[i:i + 1])
        for name in total:
            total[name] += g[name] * g[name] / n
    return total


def magnitude_scores(model: nn.Module, params: Optional[Iterable[str]] = None) -> Scores:
    """θ² for every scored parameter (default: the prunable ones); no data needed."""
    names = resolve_names(model, params)
    found = dict(model.named_parameters())
    return {n: found[n].detach() ** 2 for n in names}
