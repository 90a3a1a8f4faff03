"""Training, evaluation, fine-tuning, BatchNorm recalibration and a cache of trained models.

Everything runs on CPU by default (the benchmark machines have 2 cores and no GPU) and is deterministic:
the same seed gives the same weights (seeded global RNG, seeded shuffling, num_workers=0).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from obafx.bench import channels_last as _channels_last
from obafx.bench import data as _data
from obafx.bench import models as _models
from obafx.passes.errors import ConfigError

# Epochs for trained(name) with no arguments, and the hyperparameters that go with them; chosen so that each
# model trains in a few minutes on 2 CPU cores (see the measurements in the docstring of trained()).
DEFAULT_EPOCHS: Dict[str, float] = {"resnet20": 1, "resnet56": 1, "vgg_bn": 2, "vit_tiny": 3}
TRAIN_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "resnet20": dict(optimizer="sgd", lr=0.1, weight_decay=5e-4, channels_last=True),
    "resnet56": dict(optimizer="sgd", lr=0.1, weight_decay=5e-4, channels_last=True),
    "vgg_bn": dict(optimizer="sgd", lr=0.05, weight_decay=5e-4, channels_last=True),
    "vit_tiny": dict(optimizer="adamw", lr=2e-3, weight_decay=0.05),
}
# Peak learning rate / weight decay when the caller gives none.
_LR = {"sgd": 0.1, "adamw": 1e-3}
_WD = {"sgd": 5e-4, "adamw": 0.05}


def set_threads(n: Optional[int] = None) -> int:
    """Set torch's intra-op threads to ``n`` (None: leave torch's choice, one per physical core). Returns
    the count in use.

    One thread per core is right for one training job on an idle machine (2 cores: 2 threads). When several
    CPU-bound processes share the cores, pass 1: OpenMP threads spin-wait and oversubscription can make
    small convolutions 10-100x slower.
    """
    if n is not None and torch.get_num_threads() != n:
        if n <= 0:
            raise ConfigError(f"num_threads={n} must be positive. What to do: pass e.g. 1 or 2.")
        torch.set_num_threads(n)
    return torch.get_num_threads()


def _device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _inputs(batch: Any) -> torch.Tensor:
    """The input tensor of a batch given as (x, y, ...) or as x alone."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def channels_last_ok(model: nn.Module) -> bool:
    """Whether training ``model`` in channels_last memory format is useful on CPU (it has a Conv2d). It is safe
    for every model: the convolutions with the shape of a torch CPU bug run contiguous (obafx.bench.channels_last).
    """
    return _channels_last.useful(model)


def make_optimizer(model: nn.Module, optimizer: str = "auto", lr: Optional[float] = None,
                   weight_decay: Optional[float] = None, momentum: float = 0.9) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum) or AdamW over the model's trainable parameters.

    In: model, optimizer name ("sgd", "adamw" or "auto": SGD for BatchNorm networks, AdamW otherwise, e.g.
    transformers), peak lr and weight decay (None: per-optimizer defaults). Out: the optimizer.
    """
    if optimizer == "auto":
        optimizer = "sgd" if _has_batchnorm(model) else "adamw"
    if optimizer not in _LR:
        raise ConfigError(f"unknown optimizer {optimizer!r}. What to do: pass 'sgd', 'adamw' or 'auto'.")
    lr = _LR[optimizer] if lr is None else lr
    wd = _WD[optimizer] if weight_decay is None else weight_decay
    if lr <= 0 or wd < 0:
        raise ConfigError(f"lr={lr}, weight_decay={wd}: need lr > 0 and weight_decay >= 0.")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters. What to do: check requires_grad.")
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def warmup_cosine(opt: torch.optim.Optimizer, total_steps: int, warmup: float = 0.0):
    """Per-step schedule: linear warmup over the first ``warmup`` fraction of steps, then cosine to 0."""
    n_warm = int(warmup * total_steps)

    def factor(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        progress = (step - n_warm) / max(1, total_steps - n_warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _reseed_loader(loader: Iterable, seed: int) -> None:
    """Reseed the shuffling generator of a loader built by obafx.bench.data, so the batch order follows ``seed``.

    Other DataLoaders with shuffle=True draw their order from the global RNG, which train() seeds anyway.
    """
    gen = getattr(loader, "obafx_generator", None)
    if gen is not None:
        gen.manual_seed(seed)


def train(model: nn.Module, train_loader: Iterable, epochs: float = 1, lr: Optional[float] = None,
          optimizer: str = "auto", weight_decay: Optional[float] = None, momentum: float = 0.9,
          warmup: float = 0.1, label_smoothing: float = 0.0, max_steps: Optional[int] = None,
          progress: bool = True, seed: int = 0, channels_last: bool = False, num_threads: Optional[int] = None,
          history: Optional[List[float]] = None) -> nn.Module:
    """Train ``model`` in place with cross-entropy, warmup + cosine learning rate, one step per batch.

    In: model; a loader of (x, y) batches (needs len() unless max_steps is given); epochs (may be
    fractional, e.g. 0.5); optimizer settings (see make_optimizer); warmup fraction; max_steps caps the
    step count; seed seeds the global RNG and obafx loaders' shuffling; channels_last: ~25% faster CPU
    convolutions, used only where channels_last_ok(model) (a pruned CNN trains fastest in it when its widths are
    multiples of 8 or 16: torch's channels_last BatchNorm and oneDNN's convolutions work in such blocks, see
    benchmarks/kernel_widths.py; prune with round_to=8); num_threads: see set_threads; history, if a
    list, receives every step's loss. Out: the same model, in eval mode, with contiguous weights.
    """
    set_threads(num_threads)
    torch.manual_seed(seed)
    _reseed_loader(train_loader, seed)
    steps = _step_count(train_loader, epochs, max_steps)
    opt = make_optimizer(model, optimizer, lr, weight_decay, momentum)
    sched = warmup_cosine(opt, steps, warmup)
    channels_last = channels_last and channels_last_ok(model)
    device = _device(model)
    bar = tqdm(total=steps, desc=f"train {type(model).__name__}", disable=not progress, leave=False)
    hooks = []
    try:
        if channels_last:
            hooks = _channels_last.enter(model)
        model.train()
        done = 0
        while done < steps:
            before = done
            for x, y in train_loader:
                x, y = x.to(device), y.to(device)
                if channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                loss = _step(model, opt, x, y, label_smoothing, done)
                sched.step()
                done += 1
                if history is not None:
                    history.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                if done >= steps:
                    break
            if done == before:  # an empty loader would loop forever
                raise ConfigError("the training loader yielded no batches. What to do: pass a non-empty one.")
    finally:
        bar.close()
        if channels_last:  # callers (pruning passes, state_dict users) expect ordinary contiguous weights
            _channels_last.leave(model, hooks)
    return model.eval()


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
          label_smoothing: float, index: int) -> float:
    """One optimizer step on the batch (x, y); returns the loss. Raises ConfigError when it is not finite."""
    loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
    if not torch.isfinite(loss):
        raise ConfigError(f"training diverged at step {index} (loss {loss.item()}). What to do: lower lr "
                          f"(was {opt.param_groups[0]['initial_lr']}) or raise warmup.")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def _step_count(loader: Iterable, epochs: float, max_steps: Optional[int]) -> int:
    """Number of optimizer steps for ``epochs`` passes over ``loader``, capped by ``max_steps``."""
    if epochs <= 0 and max_steps is None:
        raise ConfigError(f"epochs={epochs} trains nothing. What to do: pass epochs > 0 or max_steps.")
    try:
        steps = max(1, round(epochs * len(loader))) if epochs > 0 else max_steps
    except TypeError:  # a loader without len(): only max_steps can say how long to train
        if max_steps is None:
            raise ConfigError("the loader has no len(), so epochs cannot be converted to steps. What to do: "
                              "pass max_steps.") from None
        steps = max_steps
    steps = min(steps, max_steps) if max_steps is not None else steps
    if steps <= 0:
        raise ConfigError(f"max_steps={max_steps} trains nothing. What to do: pass max_steps > 0.")
    return steps


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, limit_batches: Optional[int] = None,
             progress: bool = False) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (eval mode) on the (x, y) batches of ``loader``.

    In: model, loader, optional number of batches to stop after. Out: accuracy as a float. The model's
    train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    device, correct, seen = _device(model), 0, 0
    for i, (x, y) in enumerate(tqdm(loader, desc="eval", disable=not progress, leave=False)):
        if limit_batches is not None and i >= limit_batches:
            break
        correct += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
        seen += len(y)
    model.train(was_training)
    if seen == 0:
        raise ConfigError("evaluate() saw no examples. What to do: pass a non-empty loader and "
                          "limit_batches >= 1.")
    return correct / seen


def finetune(model: nn.Module, loader: Iterable, epochs: Optional[float] = None, steps: Optional[int] = None,
             lr: Optional[float] = None, optimizer: str = "auto", seed: int = 0,
             progress: bool = False) -> nn.Module:
    """The short fine-tuning given to every pruned model in a comparison (same recipe for every method).

    In: a (pruned) model, a training loader, a budget (``epochs`` or ``steps``; exactly one), lr (default:
    0.01 for SGD, i.e. BatchNorm networks, 1e-4 for AdamW), optimizer, seed. Out: the model, fine-tuned in
    place and in eval mode. Recipe: SGD momentum 0.9 (wd 1e-4, as in the OBA paper's CIFAR runs) or AdamW
    (wd 0.05), no warmup (the weights are already trained), cosine decay to 0 over the budget.
    """
    if (epochs is None) == (steps is None):
        raise ConfigError(f"finetune got epochs={epochs}, steps={steps}. What to do: give exactly one, the "
                          f"same for every method being compared.")
    kind = ("sgd" if _has_batchnorm(model) else "adamw") if optimizer == "auto" else optimizer
    lr = lr if lr is not None else {"sgd": 0.01, "adamw": 1e-4}.get(kind, 0.01)
    wd = {"sgd": 1e-4, "adamw": 0.05}.get(kind, 1e-4)
    return train(model, loader, epochs=epochs if epochs is not None else 0, max_steps=steps, lr=lr,
                 optimizer=kind, weight_decay=wd, warmup=0.0, progress=progress, seed=seed)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, n_batches: int = 20) -> nn.Module:
    """Re-estimate every BatchNorm's running mean/var on data, without gradients or weight changes.

    In: a model (plain module or torch.fx GraphModule: BatchNorms are found with named_modules), an iterable
    of (x, y) batches or of x tensors, the number of batches to use. Out: the same model in eval mode, whose
    BatchNorm running statistics are the cumulative average (momentum=None) of the batch statistics over
    those batches. Needed after pruning: the old running stats no longer match the pruned network.
    """
    bns = [m for _, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if n_batches <= 0:
        raise ConfigError(f"n_batches={n_batches}: need at least one batch. What to do: pass e.g. 20.")
    if not bns:
        return model.eval()
    momenta = [bn.momentum for bn in bns]
    model.eval()  # everything else (e.g. dropout) stays in eval; only the BatchNorms collect statistics
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: every batch weighs the same
        bn.train()
    device, used = _device(model), 0
    try:
        for batch in loader:
            if used >= n_batches:
                break
            model(_inputs(batch).to(device))
            used += 1
    finally:
        for bn, mom in zip(bns, momenta):
            bn.momentum = mom
        model.eval()
    if used == 0:
        raise ConfigError("recalibrate_bn got an empty loader. What to do: pass training batches.")
    return model


def cache_key(name: str, epochs: float, seed: int, model_kw: Dict[str, Any], train_kw: Dict[str, Any],
              data_kw: Dict[str, Any]) -> str:
    """File stem of a cached model: name, epochs, seed and a hash of every setting that changes the weights."""
    blob = json.dumps({"model": model_kw, "train": train_kw, "data": data_kw}, sort_keys=True, default=repr)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return f"{name}-e{epochs:g}-s{seed}-{digest}"


def trained(name: str, epochs: Optional[float] = None, cache_dir: os.PathLike | str = "benchmarks/cache",
            seed: int = 0, progress: bool = True, train_kw: Optional[Dict[str, Any]] = None,
            data_kw: Optional[Dict[str, Any]] = None, **model_kw) -> nn.Module:
    """A model of MODELS[name] trained on Fashion-MNIST, loaded from the cache when it was trained before.

    In: model name; epochs (default DEFAULT_EPOCHS[name]); cache folder (relative paths are relative to the
    current directory); seed (initial weights and data order); train_kw overriding TRAIN_DEFAULTS[name] (see
    train()); data_kw for data.loaders() (batch_size, root, train_limit, ...); model_kw for the builder.
    Out: the trained model in eval mode. The cache holds a weights-only state_dict ``<key>.pt`` (key: see
    cache_key) and ``<key>.json`` with the settings, test accuracy and training time.
    """
    if name not in _models.MODELS:
        raise ConfigError(f"unknown model {name!r}. What to do: pick one of {sorted(_models.MODELS)}.")
    epochs = DEFAULT_EPOCHS[name] if epochs is None else epochs
    tkw = {**TRAIN_DEFAULTS.get(name, {}), **(train_kw or {})}
    dkw = {"batch_size": 128, **(data_kw or {})}
    # root/progress only say where data comes from or what is printed: not part of the key.
    key = cache_key(name, epochs, seed, model_kw, tkw, {k: v for k, v in dkw.items() if k != "root"})
    path = Path(cache_dir) / f"{key}.pt"
    torch.manual_seed(seed)  # initial weights follow the seed
    model = _models.build(name, **model_kw)
    if path.is_file():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:  # stale or damaged file
            raise ConfigError(f"cached weights {path} do not load into {name}({model_kw}): {e}. What to do: "
                              f"delete {path} (and its .json) so that trained() retrains it.") from e
        return model.eval()
    train_loader, test_loader = _data.loaders(seed=seed, **dkw)
    start, cpu_start = time.perf_counter(), time.process_time()
    train(model, train_loader, epochs, seed=seed, progress=progress, **tkw)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    acc = evaluate(model, test_loader, progress=progress)
    # Load average is recorded because wall time on a shared 2-core machine depends on the other jobs.
    _save(path, model, {"name": name, "epochs": epochs, "seed": seed, "model_kw": model_kw, "train_kw": tkw,
                        "data_kw": dkw, "test_acc": acc, "train_seconds": round(seconds, 1),
                        "cpu_seconds": round(cpu_seconds, 1), "load_avg_1m": round(os.getloadavg()[0], 2),
                        "threads": torch.get_num_threads(), "torch": torch.__version__})
    return model


def _save(path: Path, model: nn.Module, meta: Dict[str, Any]) -> None:
    """Write the state_dict and its metadata atomically (temp file + rename: no half-written cache entry)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1, default=repr) + "\n")
