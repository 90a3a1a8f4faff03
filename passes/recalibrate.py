"""BatchNorm recalibration between pruning steps: a pruned module and calibration batches in, a copy whose
BatchNorm running statistics are those of the pruned network on the batches out.

Why: in eval mode a BatchNorm is the affine map given by its running statistics, and eval-mode scores depend on
them. After a step removes channels, the statistics downstream still describe the unpruned network (a layer whose
input lost channels produces activations with another mean and variance), so the next step would score a
network that does not exist. Train-mode scoring does not need this (the scoring copy normalises with each
batch's own statistics), but the returned model's statistics are stale either way.
"""
from __future__ import annotations

from typing import Iterable, List

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .errors import ConfigError
from .private_copy import private_copy

__all__ = ["has_batchnorm", "recalibrated"]


def _norms(model: nn.Module) -> List[_NormBase]:
    return [m for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` holds a norm layer with running statistics (BatchNorm, InstanceNorm with stats)."""
    return bool(_norms(model))


def recalibrated(model: nn.Module, batches: Iterable) -> nn.Module:
    """A copy of ``model`` whose norms' running statistics are the cumulative averages over ``batches``.

    In: any module and an iterable of ``(inputs, targets)`` pairs or bare inputs (targets are ignored).
    Out: a private copy (``model`` is untouched) where every norm with running statistics was reset and then
    fed the batches in train mode with momentum=None (equal weight per batch); everything else runs in eval
    mode (dropout off), under ``torch.no_grad`` (no gradients, no parameter changes). Training flags and momenta
    of the copy are as in ``model``. A model without such norms is returned as it is.
    """
    from .scoring import split_batch  # lazy: scoring imports torch.func machinery this module does not need

    if not has_batchnorm(model):
        return model
    copy = private_copy(model)
    norms = _norms(copy)
    flags = [(m, m.training) for m in copy.modules()]
    momenta = [(m, m.momentum) for m in norms]
    seen = 0
    try:
        copy.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: every batch counts the same
            m.train()
        with torch.no_grad():
            for batch in batches:
                args, _ = split_batch(batch)
                copy(*args)
                seen += 1
    finally:
        for m, flag in flags:
            m.training = flag
        for m, momentum in momenta:
            m.momentum = momentum
    if not seen:
        raise ConfigError("recalibration got no batches. What to do: pass data= with at least one batch, or "
                          "recalibrate=False.")
    return copy
