"""Helpers for Hugging Face transformers models: the calibration loss of a causal language model.

A transformers model captured by torch.export (compile_prune's capture="auto"/"export") prunes like any other;
what it needs besides is a loss for data-driven scores (importance="oba", "taylor", ...) on text batches.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from obafx.passes.errors import ScoreError


def causal_lm_loss(output: Any, input_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy: the logits at position t predict ``input_ids[:, t + 1]`` (mean over tokens).

    ``output``: the model's output: a logits tensor (batch, seq, vocab), an object with ``.logits``, or one with
    ``.loss`` (a transformers output when labels were given: that loss is returned as it is). Use it as
    ``compile_prune(..., importance="oba", data=[(ids, ids), ...], loss_fn=obafx.causal_lm_loss)``.
    """
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    logits = getattr(output, "logits", output)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or not isinstance(input_ids, torch.Tensor):
        raise ScoreError("causal_lm_loss needs logits shaped (batch, seq, vocab) and the input ids as targets. "
                         "What to do: pass batches as (input_ids, input_ids) pairs to a model returning logits.")
    if logits.shape[1] < 2:
        raise ScoreError("causal_lm_loss needs sequences of at least 2 tokens (one to predict the next).")
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab), input_ids[:, 1:].reshape(-1))
