"""OBA (and obafx's data-driven baselines) as Torch-Pruning importances: one line for a Torch-Pruning user.

    import torch_pruning as tp
    from obafx.tp_interop import OBAImportance
    imp = OBAImportance(batches)                      # (inputs, targets) batches; loss_fn=None: cross-entropy
    pruner = tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=0.5, iterative_steps=5)
    for _ in range(5):
        pruner.step()                                 # scores are recomputed on the current model each step

How a group is scored (OBA.md section 3, the same rule as ``obafx.passes.importance.aggregate``):
per-parameter scores s (OBA: θ ⊙ (Hθ), batch-averaged) are computed once per model state; for every member of
a Torch-Pruning group, an output-channel member (conv/linear out, depthwise conv) is the signed row sum of s(W)
plus s(b), an input-channel member (conv/linear in) the signed column sum of s(W); members are mapped to the
root's channels through ``root_idxs`` (so a flatten's H·W columns add up into their channel), their absolute
values are averaged over the members that carry any score (norm layers and free parameters carry none), and
the result is normalised (default "max": each group's best channel scores 1, as in OBA; any Torch-Pruning
normalizer name or callable also works). Scores are float64. nn.MultiheadAttention members carry no score here.

Recomputation: the cache is keyed on every parameter's identity, shape, storage and version counter, which all
change when Torch-Pruning prunes (new Parameters) or an optimizer steps (in-place update). Changes made through
``.data`` bypass the version counter: call ``reset()`` after them.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional, Tuple, Union

import torch
from torch import Tensor, nn

import torch_pruning as tp
from torch_pruning.pruner import function as tpf

from obafx.distributed import local_parameter_scores, reduced_parameter_scores
from obafx.passes.importance import parameter_criteria, resolve_train, resolve_unit_sum, summands
from obafx.passes.errors import ConfigError
from obafx.passes.facts import ScoreContext
from obafx.passes.hvp import DEFAULT_MODE

__all__ = ["CriterionImportance", "OBAImportance"]

_OUT_FNS = (tpf.prune_conv_out_channels, tpf.prune_linear_out_channels, tpf.prune_depthwise_conv_out_channels,
            tpf.prune_depthwise_conv_in_channels)  # depthwise: its in and out channels are its rows
_IN_FNS = (tpf.prune_conv_in_channels, tpf.prune_linear_in_channels)


class CriterionImportance(tp.importance.GroupMagnitudeImportance):
    """A Torch-Pruning group importance computed from obafx per-parameter scores.

    In: ``criterion``: "oba" (θ ⊙ (Hθ)), "taylor" (θ ⊙ ḡ), "obd" (½θ²·diag H), "fisher" (½θ²·empirical Fisher);
    ``batches``: a sequence of (inputs, targets) batches reused at every recomputation, or a zero-argument
    callable returning the batches for the next one (fresh batches per pruning step); ``loss_fn`` (default
    cross-entropy), ``mode``/``delta`` (OBA), ``train`` (None: the criterion's default, train mode for OBA),
    ``chunk_size``, ``progress``: as in ``obafx.passes.hvp.parameter_scores``; ``seed``: OBD's Hutchinson probes;
    ``normalizer``: "max" (OBA's; a group of all-zero scores stays zero) or any Torch-Pruning normalizer;
    ``model``: the model to score (default: the group's dependency graph's model); ``distributed``: all-reduce the scores over torch.distributed ranks (each rank passes its shard);
    ``criterion_kw``: extra keywords of the criterion function (e.g. ``diagonal="exact"`` for OBD);
    ``unit_sum``: "signed", "abs" or "member" (see compile_prune; None = the criterion's default: "member" for OBA;
    Torch-Pruning's groups are always averaged over members of |member sum|, so "member" ranks as "signed" here).
    Call: ``imp(group) -> Tensor`` (float64, one score per root channel) or None for a group without any
    scored layer. ``computations`` counts score recomputations; ``history`` holds each one's parameter shapes.
    """

    def __init__(self, criterion: str = "oba", batches: Union[Iterable, Callable[[], Iterable], None] = None,
                 loss_fn: Optional[Callable] = None, *, mode: str = DEFAULT_MODE, delta: float = 0.0,
                 train: Optional[bool] = None, normalizer: Any = "max", model: Optional[nn.Module] = None,
                 chunk_size: Optional[int] = None, progress: bool = False, seed: int = 0, distributed: bool = False,
                 unit_sum: Optional[str] = None, **criterion_kw):
        if criterion not in parameter_criteria():
            raise ConfigError(f"criterion={criterion!r}. What to do: use one of {parameter_criteria()} (Torch-"
                              f"Pruning's own GroupMagnitudeImportance/RandomImportance cover the data-free ones)")
        if batches is None:
            raise ConfigError(f"the {criterion} importance needs calibration data. What to do: pass batches=[(x, y), "
                              f"...] or a callable returning the batches of the next pruning step")
        self.criterion, self.batches, self.model = criterion, batches, model
        self.unit_sum = resolve_unit_sum(unit_sum, criterion)
        self.ctx = ScoreContext(loss_fn=loss_fn, mode=mode, delta=delta, train=resolve_train(train, criterion),
                                seed=seed, progress=progress, chunk_size=chunk_size)
        self.normalizer, self.distributed, self.criterion_kw = normalizer, distributed, criterion_kw
        self.group_reduction, self.target_types, self.bias = "mean", [nn.modules.conv._ConvNd, nn.Linear], True
        self.computations, self.history = 0, []
        self._key: Optional[Tuple] = None
        self._by_param: Dict[int, Tensor] = {}

    def reset(self) -> None:
        """Forget the cached scores (the next group is scored on a fresh computation)."""
        self._key, self._by_param = None, {}

    # ------------------------------------------------------------------------------------------ scores

    def parameter_scores(self, model: nn.Module) -> Dict[str, Tensor]:
        """Per-parameter scores of ``model`` on the next batches (recomputed on every call)."""
        batches = list(self.batches() if callable(self.batches) else self.batches)
        kw = dict(self.criterion_kw)
        with torch.enable_grad():  # Torch-Pruning calls importances under torch.no_grad()
            if self.distributed:
                return reduced_parameter_scores(self.criterion, model, batches, self.ctx, **kw)
            return local_parameter_scores(self.criterion, model, batches, self.ctx, **kw)

    def _scores_for(self, model: nn.Module) -> Dict[int, Tensor]:
        """id(parameter) -> float64 score, recomputed only when the model's parameters changed."""
        params = list(model.named_parameters())
        key = tuple((n, id(p), tuple(p.shape), p.data_ptr(), p._version) for n, p in params)
        if key != self._key:
            scores = summands(self.parameter_scores(model), self.unit_sum)
            found = dict(params)
            self._by_param = {id(found[n]): s.detach().to(torch.float64) for n, s in scores.items()}
            self._key = key
            self.computations += 1
            self.history.append({n: tuple(p.shape) for n, p in params})
        return self._by_param

    def _model_of(self, group) -> nn.Module:
        model = self.model if self.model is not None else getattr(getattr(group, "_DG", None), "model", None)
        if model is None:
            raise ConfigError("cannot tell which model this group belongs to. What to do: pass model=... to the "
                              "importance")
        return model

    # ------------------------------------------------------------------------------------------ groups

    @torch.no_grad()
    def __call__(self, group) -> Optional[Tensor]:
        """One float64 score per channel of the group's root (see the module docstring), or None."""
        scores = self._scores_for(self._model_of(group))
        root_idxs = group[0].root_idxs if group[0].root_idxs is not None else group[0].idxs
        position = {r: k for k, r in enumerate(root_idxs)}
        n = len(root_idxs)
        members, relevant = [], False
        for item in group.items:
            vec = member_vector(item.dep.target.module, item.dep.handler, item.idxs, scores)
            if vec is None:
                continue
            relevant = True
            roots = item.root_idxs if item.root_idxs is not None else item.idxs
            if any(r is None or r not in position for r in roots):
                continue  # Torch-Pruning skips members it cannot map to the root as well
            signed = torch.zeros(n, dtype=torch.float64).index_add_(
                0, torch.tensor([position[r] for r in roots], dtype=torch.long), vec.cpu())
            if torch.any(signed != 0):  # average only over members that carry a score
                members.append(signed.abs())
        if not relevant:
            return None
        imp = torch.stack(members).mean(0) if members else torch.zeros(n, dtype=torch.float64)
        return self._normalise(imp)

    def _normalise(self, imp: Tensor) -> Tensor:
        if self.normalizer == "max":  # OBA: divide by the group's max; an all-zero group stays zero
            top = imp.max()
            return imp / top if top > 0 else imp
        return self._normalize(imp, self.normalizer)


def member_vector(layer: nn.Module, handler, idxs, scores: Dict[int, Tensor]) -> Optional[Tensor]:
    """Signed score of each index in ``idxs`` of one group member, or None when the member carries no score.

    Out-channel handlers: row sums of s(W) plus s(b); in-channel handlers: column sums of s(W) (for grouped
    convs, the column within its group's rows). ``scores``: id(parameter) -> per-parameter score tensor.
    """
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, nn.Parameter) or id(weight) not in scores:
        return None
    s = scores[id(weight)]
    transposed = bool(getattr(layer, "transposed", False))
    idx = torch.as_tensor(list(idxs), dtype=torch.long, device=s.device)
    if handler in _OUT_FNS:
        rows = (s.transpose(0, 1) if transposed else s).flatten(1).sum(1)
        bias = getattr(layer, "bias", None)
        if isinstance(bias, nn.Parameter) and id(bias) in scores:
            rows = rows + scores[id(bias)]
        return rows[idx]
    if handler in _IN_FNS:
        return _column_sums(s, int(getattr(layer, "groups", 1)), transposed)[idx]
    return None


def _column_sums(s: Tensor, groups: int, transposed: bool) -> Tensor:
    """Per input channel, the sum of s(W) over the weights that read it (its group's rows only)."""
    if transposed:  # ConvTranspose weight: (in, out/groups, ...): input channels are the rows
        return s.flatten(1).sum(1)
    if s.dim() == 2 or groups == 1:
        return s.transpose(0, 1).flatten(1).sum(1)
    out_ch, in_per_group = s.shape[0], s.shape[1]
    per_group = s.reshape(groups, out_ch // groups, in_per_group, -1).sum(dim=(1, 3))  # (groups, in/groups)
    return per_group.reshape(-1)


class OBAImportance(CriterionImportance):
    """OBA scores θ ⊙ (Hθ) as a Torch-Pruning importance: ``OBAImportance(batches, loss_fn=None, mode=...)``
    (default: DEFAULT_MODE of obafx.passes.facts).

    ``mode``: "full" (the loss Hessian) or "residual" (H − G). Other keywords as in CriterionImportance.
    """

    def __init__(self, batches, loss_fn: Optional[Callable] = None, mode: str = DEFAULT_MODE, **kw):
        super().__init__("oba", batches, loss_fn, mode=mode, **kw)
