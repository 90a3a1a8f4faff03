"""compile_prune's unstructured branch: same tracing and scoring, weights zeroed instead of channels removed."""
from __future__ import annotations

import torch.fx as fx

from obafx.batches import BatchSource, scored_with, warn_once
from obafx.passes.hvp import parameter_scores, prunable_parameter_names
from obafx.passes.macs import param_count, thop_macs
from obafx.passes.trace import trace
from obafx.passes.unstructured import apply_masks, global_masks, unstructured_scores
from obafx.report import Report, attach, input_spec


def prune_unstructured(model, example_input, *, sparsity: float, importance: str, data, loss_fn, mode: str,
                       delta: float, train: bool, leaf_modules, progress: bool) -> fx.GraphModule:
    """A traced copy of ``model`` with the ``sparsity`` fraction of prunable weights zeroed (global threshold).

    importance: "oba" (OBA.md's unstructured score) or "magnitude" (|θ|)."""
    traced = trace(model, example_input, leaf_modules)
    gm = traced.gm
    names = [n for n in prunable_parameter_names(gm) if n.endswith("weight")]
    params = {n: p for n, p in gm.named_parameters() if n in names}
    notes = []
    source = BatchSource(data, 1, traced.inputs, None)
    if importance == "oba":
        if source.note:
            warn_once(source.note)
            notes.append(source.note)
        s = parameter_scores(gm, source.for_step(), loss_fn=loss_fn, mode=mode, delta=delta, train=train,
                             params=names, progress=progress)
        scores = unstructured_scores(s, params)
    elif importance == "magnitude":
        scores = {n: p.detach().abs().double() for n, p in params.items()}
    else:
        from obafx.passes.errors import ConfigError
        raise ConfigError(f"structure='unstructured' supports importance='oba' or 'magnitude', not {importance!r}.")
    masks = global_masks(scores, sparsity)
    per_tensor = apply_masks(gm, masks)
    total = sum(m.numel() for m in masks.values())
    zeroed = sum((~m).sum().item() for m in masks.values())
    macs, _ = thop_macs(gm, traced.inputs)
    count = param_count(gm)
    rep = Report(count, count, macs, macs, importance, 1, [], [], {}, None, notes, {}, per_tensor,
                 zeroed / max(total, 1), input_spec(traced.inputs), scored_with(importance, loss_fn, source))
    attach(gm, rep)
    return gm
