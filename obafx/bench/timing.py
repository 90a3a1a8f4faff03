"""CPU/GPU latency and throughput measured as medians over repetitions (timing here is noisy: never one run)."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List

import torch
from torch import nn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], reps: int = 20, warmup: int = 3, device: str = "cpu") -> Dict[str, float]:
    """Median, min and max wall time of ``fn()`` over ``reps`` runs after ``warmup`` runs."""
    dev = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(dev)
    times: List[float] = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "reps": reps}


def latency(model: nn.Module, example: torch.Tensor, reps: int = 20, warmup: int = 3) -> Dict[str, float]:
    """Inference latency of ``model(example)`` in eval mode without gradients (the model's mode is restored)."""
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return median_seconds(lambda: model(example), reps, warmup, str(example.device))
    finally:
        model.train(was)


def interleaved(models: Dict[str, nn.Module], example: torch.Tensor, rounds: int = 5, reps: int = 5) -> Dict[str, float]:
    """Median latency of several models measured in alternation, so that a slow burst of the machine hits all of
    them alike; ratios of these medians are the honest comparison."""
    return {k: statistics.median(v) for k, v in interleaved_rounds(models, example, rounds, reps).items()}


def interleaved_rounds(models: Dict[str, nn.Module], example: torch.Tensor, rounds: int = 5,
                       reps: int = 5) -> Dict[str, List[float]]:
    """Per model, the median latency of each of ``rounds`` rounds, the models alternating within a round (the
    spread of these says how much to trust a difference)."""
    per: Dict[str, List[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for name, m in models.items():
            per[name].append(latency(m, example, reps=reps, warmup=1)["median"])
    return per
