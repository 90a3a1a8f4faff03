"""The committed dense models: train them (with augmentation) and load them.

    python3 -m obafx.bench.dense --models resnet20,vgg_bn,vit_tiny     # trains, writes benchmarks/models/
    python3 -m obafx.bench.dense --models resnet20 --epochs 1 --out /tmp/m   # a shorter run elsewhere

Each model is written as ``<out>/<name>.safetensors`` (weights only) and ``<out>/<name>.json`` (the command, seed,
epochs, every hyperparameter, accuracy on the full 10k test set, training time, machine). Benchmarks and
``obafx demo`` start from these files through ``load()``, so every machine prunes the same weights.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from obafx.bench import augment as _augment
from obafx.bench import data as _data
from obafx.bench import models as _models
from obafx.bench import train as _train
from obafx.passes.errors import ConfigError

# Where the committed files live: benchmarks/models of the repository this package sits in (override with
# $OBAFX_MODELS, e.g. for an installed package).
MODELS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "models"
ENV_VAR = "OBAFX_MODELS"

# The recipes behind the committed files: SGD (Nesterov) or AdamW, short linear warmup, cosine to 0, batch 128,
# random crop (4 px padding) + horizontal flip. Epochs were sized to the CPU time the benchmark session had
# (one shared core for about an hour): more epochs would give better dense models.
RECIPES: Dict[str, Dict[str, Any]] = {
    "resnet20": dict(epochs=9, optimizer="sgd", lr=0.1, weight_decay=5e-4, warmup=0.03, channels_last=True),
    "vgg_bn": dict(epochs=8, optimizer="sgd", lr=0.05, weight_decay=5e-4, warmup=0.03, channels_last=True),
    "vit_tiny": dict(epochs=10, optimizer="adamw", lr=2e-3, weight_decay=0.05, warmup=0.1),
}
BATCH_SIZE = 128
PAD = 4


def models_dir() -> Path:
    """The folder of the dense models: ``$OBAFX_MODELS`` if set, else the repository's benchmarks/models."""
    return Path(os.environ.get(ENV_VAR) or MODELS_DIR)


def load(name: str, folder: Optional[os.PathLike | str] = None) -> nn.Module:
    """The committed dense model ``name`` in eval mode.

    In: a model name of models.MODELS; folder (default models_dir()). Out: the model with the weights of
    ``<folder>/<name>.safetensors``. Raises ConfigError naming the command that writes the file when it is missing.
    """
    from safetensors.torch import load_file

    path = Path(folder or models_dir()) / f"{name}.safetensors"
    if not path.is_file():
        raise ConfigError(f"no trained weights at {path}. What to do: run `python3 -m obafx.bench.dense --models "
                          f"{name}` (or point ${ENV_VAR} at the folder holding {name}.safetensors).")
    model = _models.build(name)
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as e:
        raise ConfigError(f"{path} does not load into {name}: {e}. What to do: retrain it with `python3 -m "
                          f"obafx.bench.dense --models {name}`.") from e
    return model.eval()


def available(name: str, folder: Optional[os.PathLike | str] = None) -> bool:
    """Whether ``<folder>/<name>.safetensors`` exists."""
    return (Path(folder or models_dir()) / f"{name}.safetensors").is_file()


def train_dense(name: str, epochs: Optional[float] = None, seed: int = 0, progress: bool = True,
                train_limit: Optional[int] = None) -> tuple[nn.Module, Dict[str, Any]]:
    """Train ``name`` from scratch with RECIPES[name] (``epochs`` overrides its epochs) and augmentation.

    Out: (the model in eval mode, metadata: recipe, seed, test accuracy on the whole test set, timings).
    """
    if name not in RECIPES:
        raise ConfigError(f"no training recipe for {name!r}. What to do: pick one of {sorted(RECIPES)}.")
    recipe = dict(RECIPES[name])
    default_epochs = recipe.pop("epochs")
    epochs = default_epochs if epochs is None else epochs
    torch.manual_seed(seed)
    model = _models.build(name)
    train_loader, test_loader = _data.loaders(batch_size=BATCH_SIZE, seed=seed, train_limit=train_limit)
    loader = _augment.Augmented(train_loader, seed=seed, pad=PAD)
    history: list = []
    start, cpu = time.perf_counter(), time.process_time()
    _train.train(model, loader, epochs, seed=seed, progress=progress, history=history, **recipe)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    acc = _train.evaluate(model, test_loader)
    per_epoch = max(1, len(loader))
    losses = [sum(history[i:i + per_epoch]) / len(history[i:i + per_epoch]) for i in range(0, len(history), per_epoch)]
    meta = {"name": name, "seed": seed, "epochs": epochs, "batch_size": BATCH_SIZE, **recipe,
            "augmentation": f"random crop of the 32x32 padded image after {PAD}-px background padding, "
                            "horizontal flip p=0.5", "train_examples": len(train_loader.dataset),
            "data_set": "Fashion-MNIST (28x28 zero-padded to 32x32, normalised)",
            "test_acc": acc, "test_examples": len(test_loader.dataset), "epoch_mean_loss": losses,
            "train_seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1), "machine": _machine()}
    return model, meta


def save(model: nn.Module, meta: Dict[str, Any], folder: os.PathLike | str) -> Path:
    """Write ``<folder>/<name>.safetensors`` and its JSON (atomically: temp file + rename). Out: the weights path."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{meta['name']}.safetensors"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    return path


def _machine() -> Dict[str, Any]:
    """What the training ran on: CPU, threads, load, versions (wall times depend on the other jobs)."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2),
            "torch": torch.__version__, "python": platform.python_version()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Train the dense benchmark models and write them as safetensors.")
    p.add_argument("--models", default=",".join(RECIPES), help="comma-separated names")
    p.add_argument("--epochs", type=float, default=None, help="override the recipe's epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 when other jobs share the cores)")
    p.add_argument("--train-limit", type=int, default=None, help="train on the first N examples (smoke runs)")
    p.add_argument("--out", default=None, help="folder (default: benchmarks/models of this repository)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    _train.set_threads(args.threads)
    for name in args.models.split(","):
        model, meta = train_dense(name, args.epochs, args.seed, not args.quiet, args.train_limit)
        meta["command"] = "python3 -m obafx.bench.dense " + " ".join(argv if argv is not None else sys.argv[1:])
        path = save(model, meta, args.out or models_dir())
        print(f"{name}: test accuracy {meta['test_acc']:.4f} in {meta['train_seconds']:.0f} s -> {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
