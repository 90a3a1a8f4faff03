"""Data-parallel calibration on torch.distributed: each rank scores its shard, the scores are all-reduced, and
every rank applies the same plan, so all ranks end with identical pruned models.

Launch with torchrun (no process management here; torchrun and torch.distributed do it)::

    torchrun --standalone --nproc_per_node=2 examples/distributed_prune.py --out DIR

and in the script::

    from obafx.distributed import distributed_importance, init_distributed, shard
    rank, world, device = init_distributed()            # gloo on CPU, NCCL on GPU (picked by device)
    model = build_same_model_on_every_rank().to(device)  # seed it identically on every rank
    pruned = obafx.compile_prune(model, x, macs=0.5, importance=distributed_importance("oba"),
                                 data=shard(all_batches))

How the mean stays exact: a rank's per-parameter scores are the mean over its own batches, so the rank sends
(mean x its batch count) and its count; the all-reduced sums divided by the all-reduced count give the mean
over ALL batches, i.e. the single-process scores on the union of the shards (up to float64 round-off). The
reduction runs in float64 and every rank receives the same reduced tensor, so every rank derives the same unit
scores, the same selection and the same rewrite. Without an initialised process group everything runs as one
process (world size 1), so the same script also runs without torchrun.
"""
from __future__ import annotations

import dataclasses
import os
import zlib
from datetime import timedelta
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from obafx.passes.errors import ConfigError, ScoreError
from obafx.passes.facts import Coupling, ScoreContext
from obafx.passes.importance import (CALLABLE_DEFAULTS, PARAMETER_CRITERIA, REGISTRY, aggregate, parameter_criteria,
                                     summands)
from obafx.passes.private_copy import private_copy
from obafx.passes.recalibrate import recalibrated

__all__ = ["init_distributed", "shard", "all_reduce_scores", "distributed_importance", "local_parameter_scores",
           "reduced_parameter_scores", "rank_and_world", "DATA_CRITERIA", "recalibrated_across",
           "summed_across"]

DATA_CRITERIA = PARAMETER_CRITERIA  # criteria with per-parameter scores from calibration batches (the registry's)
_OBD_SEED_STRIDE = 1_000_003  # Hutchinson probes differ per rank (independent estimates), reproducibly


def rank_and_world(group=None) -> Tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) when no process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def init_distributed(device: Optional[Any] = None, timeout_s: float = 600.0) -> Tuple[int, int, torch.device]:
    """Initialise the default process group from torchrun's environment; returns (rank, world size, device).

    ``device``: where this rank computes (default: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU).
    The backend follows the device: NCCL for CUDA, gloo for the CPU. Calling it again returns the same values.
    """
    if not dist.is_available():
        raise ConfigError("torch.distributed is not available in this torch build. What to do: install a torch "
                          "build with distributed support, or prune in one process")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ConfigError("RANK/WORLD_SIZE are not set: this process was not started by torchrun. What to do: "
                              "launch with `torchrun --standalone --nproc_per_node=N script.py`")
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kw)
    return dist.get_rank(), dist.get_world_size(), device


def shard(data: Sequence, rank: Optional[int] = None, world_size: Optional[int] = None) -> List:
    """This rank's share of ``data`` (a sequence of batches, the same on every rank): ``data[rank::world]``.

    The shards are disjoint and their union is ``data``. Raises ConfigError (on every rank alike, since every
    rank sees the same length) when there are fewer batches than ranks.
    """
    r, w = rank_and_world()
    rank = r if rank is None else rank
    world_size = w if world_size is None else world_size
    items = list(data)
    if len(items) < world_size:
        raise ConfigError(f"{len(items)} calibration batches cannot be shared by {world_size} ranks. What to do: "
                          f"pass at least one batch per rank")
    return items[rank::world_size]


def _comm_device(group) -> torch.device:
    """Where collective tensors live: the current CUDA device for NCCL, the CPU otherwise."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_agree(values: Tensor, what: str, hint: str, group) -> None:
    """Raise ConfigError on every rank unless ``values`` (float64) is identical on all ranks (one all-reduce)."""
    v = torch.nan_to_num(values.to(torch.float64), nan=0.0)
    both = torch.cat([v, -v]).to(_comm_device(group))
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    hi, lo = both[:v.numel()].cpu(), -both[v.numel():].cpu()
    if not torch.equal(hi, lo):
        raise ConfigError(f"the ranks disagree on {what}. What to do: {hint}")


def _layout(param_scores: Dict[str, Tensor]) -> Tensor:
    """(number of tensors, total numel, CRC of names and shapes) of a score dict, to compare across ranks."""
    text = ";".join(f"{n}:{tuple(t.shape)}" for n, t in sorted(param_scores.items()))
    numel = sum(t.numel() for t in param_scores.values())
    return torch.tensor([len(param_scores), numel, zlib.crc32(text.encode())], dtype=torch.float64)


def all_reduce_scores(param_scores: Dict[str, Tensor], n_batches: int, group=None,
                      failed: bool = False) -> Dict[str, Tensor]:
    """Mean over the batches of ALL ranks, from each rank's mean over its own ``n_batches`` batches.

    In: ``param_scores`` (name -> tensor, the same names and shapes on every rank; a rank with no batches
    passes zeros and ``n_batches=0``), ``failed``: this rank's scoring failed (every rank then raises
    ScoreError instead of hanging). Out: name -> Σ_ranks n_r·mean_r / Σ_ranks n_r, in each tensor's dtype and
    device; identical on every rank (the sums are reduced once, in float64). Collective: call it on every rank.
    """
    _, world = rank_and_world(group)
    names = sorted(param_scores)
    if world > 1:
        _check_agree(_layout(param_scores), "the names/shapes of the scored parameters",
                     "build the same model on every rank and prune with the same options", group)
    dev = _comm_device(group) if world > 1 else torch.device("cpu")
    flat = [param_scores[n].detach().to(dev, torch.float64).reshape(-1) * float(n_batches) for n in names]
    packed = torch.cat(flat + [torch.tensor([float(n_batches), float(failed)], dtype=torch.float64, device=dev)])
    if world > 1:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    total, failures = float(packed[-2]), int(packed[-1])
    if failures:
        raise ScoreError(f"scoring failed on {failures} of {world} ranks (see their errors). What to do: fix the "
                         f"error reported by the failing rank")
    if total <= 0:
        raise ScoreError("no rank had calibration batches. What to do: pass data= with at least one batch")
    out, offset = {}, 0
    for n in names:
        t = param_scores[n]
        out[n] = (packed[offset:offset + t.numel()] / total).reshape(t.shape).to(t.device, t.dtype)
        offset += t.numel()
    return out


def local_parameter_scores(criterion: str, model: nn.Module, batches: List, ctx: ScoreContext,
                           rank: int = 0, **kw) -> Dict[str, Tensor]:
    """Per-parameter scores of ``criterion`` ("oba", "taylor", "obd", "fisher") on this rank's ``batches``,
    with the options of ``ctx`` (loss, OBA mode/delta, train, chunk size, progress) and extra keywords ``kw``
    for the criterion function (e.g. ``diagonal="exact"`` for OBD). Out: name -> mean over ``batches``."""
    entry = REGISTRY.get(criterion) if isinstance(criterion, str) else None
    if entry is None or entry.parameters is None:
        raise ConfigError(f"criterion={criterion!r} has no per-parameter scores. What to do: use one of "
                          f"{parameter_criteria()}")
    if criterion == "obd":  # independent Hutchinson probes on every rank
        kw["seed"] = kw.pop("seed", ctx.seed) + _OBD_SEED_STRIDE * rank
    return entry.parameters(model, batches, ctx, **kw)


def _model_fingerprint(model: nn.Module) -> Tensor:
    """Per parameter and buffer: float64 sum and sum of squares (equal bit for bit on identical models)."""
    tensors = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    rows = [torch.tensor([float(len(tensors)), float(sum(t.numel() for t in tensors))], dtype=torch.float64)]
    for t in tensors:
        d = t.detach().to(torch.float64)
        rows.append(torch.stack([d.sum(), (d * d).sum()]).cpu())
    return torch.cat(rows)


def _zeros_like_scores(model: nn.Module) -> Dict[str, Tensor]:
    """Zero scores for the default scored parameters (what a rank without batches contributes)."""
    from obafx.passes.hvp import prunable_parameter_names
    params = dict(model.named_parameters())
    return {n: torch.zeros_like(params[n]) for n in prunable_parameter_names(model)}


def reduced_parameter_scores(criterion: str, model: nn.Module, batches: Optional[Iterable], ctx: ScoreContext,
                             group=None, **kw) -> Dict[str, Tensor]:
    """``local_parameter_scores`` on this rank's ``batches`` (may be empty), then ``all_reduce_scores``: the mean
    over every rank's batches, the same on every rank. An error on one rank makes every rank raise (the failing
    rank its own error, the others ScoreError) instead of leaving them waiting in a collective."""
    rank, _ = rank_and_world(group)
    batches = list(batches) if batches is not None else []
    error: Optional[Exception] = None
    local = _zeros_like_scores(model)
    if batches:
        try:
            local = local_parameter_scores(criterion, model, batches, ctx, rank, **dict(kw))
        except Exception as err:  # noqa: BLE001 - re-raised below, after telling the other ranks
            error = err
    try:
        return all_reduce_scores(local, len(batches) if error is None else 0, group, failed=error is not None)
    except ScoreError:
        if error is not None:
            raise error
        raise


def distributed_importance(criterion: str = "oba", *, group=None, check_model: bool = True,
                           **criterion_kw) -> Callable[[nn.Module, Coupling, ScoreContext], Dict[int, float]]:
    """An ``importance=`` callable for ``obafx.compile_prune`` that scores data-parallel across ranks.

    In: ``criterion``: "oba", "taylor", "obd", "fisher" (scored on each rank's ``data=`` shard, then
    all-reduced: equal to the single-process scores on the union of the shards), "magnitude" (no data, computed
    locally) or "random" (seeded with rank 0's seed, so every rank draws the same numbers). ``group``: the
    process group (default: the world). ``check_model``: first verify that every rank holds the same
    parameters (one small all-reduce; a mismatch raises ConfigError on every rank instead of diverging).
    ``criterion_kw``: extra keywords of the criterion function (e.g. ``diagonal="exact"`` for OBD; OBD's
    Hutchinson probes are seeded per rank, so they are independent across ranks).
    Out: ``f(model, coupling, ctx) -> {unit: score}``, the same on every rank. Collective: every rank must
    call compile_prune with the same arguments.
    """
    known = parameter_criteria() + ("magnitude", "random")
    if criterion not in known:
        raise ConfigError(f"criterion={criterion!r} is unknown. What to do: use one of {known}")

    def importance(model: nn.Module, coupling: Coupling, ctx: ScoreContext) -> Dict[int, float]:
        _, world = rank_and_world(group)
        if check_model and world > 1:
            _check_agree(_model_fingerprint(model), "the model's parameters and buffers",
                         "seed the model's construction identically on every rank (torch.manual_seed before "
                         "building it) or load the same checkpoint everywhere", group)
        if criterion == "magnitude":
            return REGISTRY["magnitude"].units(model, coupling, ctx)
        if criterion == "random":
            same_seed = dataclasses.replace(ctx, seed=_rank0_seed(ctx.seed, group))
            return REGISTRY["random"].units(model, coupling, same_seed)
        scores = reduced_parameter_scores(criterion, model, ctx.batches, ctx, group, **criterion_kw)
        return aggregate(coupling, summands(scores, ctx.unit_sum), normalizer=ctx.normalizer, unit_sum=ctx.unit_sum)

    importance.__name__ = f"{criterion} (distributed)"
    for field in CALLABLE_DEFAULTS:  # needs data, ranks, sums units and scores in the mode the named criterion does
        setattr(importance, field, getattr(REGISTRY[criterion], field))
    # compile_prune recalibrates BatchNorm between steps with this: on the union of the shards, so that every
    # rank keeps identical statistics (each rank's own shard would make the ranks' models drift apart)
    importance.recalibrated = lambda model, batches: recalibrated_across(model, batches, group)
    # and refits LayerNorms that lost channels from sums over the union of the shards, for the same reason
    importance.summed_across = lambda sums: summed_across(sums, group)
    return importance


def summed_across(sums: Tensor, group=None) -> Tensor:
    """``sums`` added over all ranks (one all-reduce, on the CPU on return); ``sums`` itself when not distributed."""
    if rank_and_world(group)[1] == 1:
        return sums
    out = sums.to(_comm_device(group))
    dist.all_reduce(out, group=group)
    return out.cpu()


def recalibrated_across(model: nn.Module, batches: Iterable, group=None) -> nn.Module:
    """`obafx.passes.recalibrate.recalibrated` over the batches of ALL ranks: each rank recalibrates a copy on
    its own ``batches`` (cumulative means over batches), then the statistics are combined weighted by each rank's
    batch count (one float64 all-reduce), so every rank gets the same statistics, those of the union."""
    batches = list(batches)
    local = recalibrated(model, batches) if batches else private_copy(model)
    norms = [m for m in local.modules() if isinstance(m, _NormBase) and m.track_running_stats]
    if rank_and_world(group)[1] == 1 or not norms:
        return local
    dev, n = _comm_device(group), float(len(batches))
    stats = [t for m in norms for t in (m.running_mean, m.running_var)]
    packed = torch.cat([t.detach().to(dev, torch.float64).reshape(-1) * n for t in stats]
                       + [torch.tensor([n], dtype=torch.float64, device=dev)])
    dist.all_reduce(packed, group=group)
    if packed[-1] <= 0:
        raise ConfigError("no rank had calibration batches to recalibrate BatchNorm with. What to do: pass data= "
                          "with at least one batch, or recalibrate=False")
    offset = 0
    with torch.no_grad():
        for t in stats:
            t.copy_((packed[offset:offset + t.numel()] / packed[-1]).reshape(t.shape))
            offset += t.numel()
        for m in norms:
            m.num_batches_tracked.fill_(int(packed[-1].item()))
    return local


def _rank0_seed(seed: int, group) -> int:
    """Rank 0's ``seed`` on every rank (one broadcast; the seed itself when not distributed)."""
    _, world = rank_and_world(group)
    if world == 1:
        return int(seed)
    value = torch.tensor([int(seed)], dtype=torch.int64, device=_comm_device(group))
    dist.broadcast(value, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return int(value.item())
