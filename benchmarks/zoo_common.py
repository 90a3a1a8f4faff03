"""Shared by the zoo benchmark's two halves (zoo.py: obafx, zoo_tp.py: Torch-Pruning): model set-up, tolerances,
obafx's analysis and which modules normalise over channels."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torchvision

from obafx.passes.channel_graph import analyze
from obafx.passes.coupling import couple
from obafx.passes.trace import trace
from obafx.passes.verify import max_relative_error

TARGET, MAC_TOL = 0.5, 0.02  # MACs ratio must land in TARGET * (1 -/+ MAC_TOL)
FLOAT64_MAX_PARAMS = 150e6  # float32 beyond: deep random nets amplify float32 round-off past 1e-4
_NORM_FUNCS = ("layer_norm", "group_norm")


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Give biases, norm affines and constant-initialised tensors random values (norm scales near 1, running
    variances positive) and jitter every other tensor (relative 1e-6), so that values are distinct in the model's
    dtype (decode_kept tracks channels by value)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
            if name.endswith("running_var"):
                t.copy_(0.5 + noise.abs())
            elif t.dim() <= 1 or not t.any() or (t.numel() <= 1e6 and t.unique().numel() < t.numel()):
                t.copy_((1.0 if name.endswith("weight") and t.dim() == 1 else 0.0) + 0.1 * noise)
            else:
                t.mul_(1 + 1e-6 * noise)


def build(name: str, sizes: Tuple[int, ...]) -> Tuple[torch.nn.Module, torch.Tensor, str]:
    """The randomised eval-mode model, the first input size (of ``sizes``) it runs on, and its dtype name:
    float64, or float32 for models over 150M parameters or that need 224x224 (time on a 2-core machine)."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    errors = []
    for size in sizes:
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
        try:
            with torch.no_grad():
                model(x)
        except Exception as exc:  # the model refuses this size: try the next one
            errors.append(f"{size}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        big = sum(p.numel() for p in model.parameters()) > FLOAT64_MAX_PARAMS or size >= 224
        dtype = torch.float32 if big else torch.float64
        model = model.to(dtype)
        randomise(model)
        return model, x.to(dtype), str(dtype).replace("torch.", "")
    raise RuntimeError(f"no input size runs: {errors}")


def exact_tol(x: torch.Tensor) -> float:
    return 1e-9 if x.dtype == torch.float64 else 1e-4


def rel_err(a: Any, b: Any) -> float:
    return max_relative_error(a, b)


def macs_ok(ratio: Optional[float]) -> bool:
    return ratio is not None and abs(ratio / TARGET - 1.0) <= MAC_TOL


def analyse(model: torch.nn.Module, x: torch.Tensor):
    """obafx's low-level analysis: (traced, facts, coupling)."""
    traced = trace(model, x)
    facts = analyze(traced)
    return traced, facts, couple(facts)


def norm_owners(gm: torch.fx.GraphModule) -> set:
    """Owners (module names, or node names of functional calls) of LayerNorm/GroupNorm work in ``gm``."""
    owners = {name for name, m in gm.named_modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm))}
    for n in gm.graph.nodes:
        if n.op == "call_function" and getattr(n.target, "__name__", "") in _NORM_FUNCS:
            owners.add(n.name)
            owners.update(a.target.rpartition(".")[0] for a in n.all_input_nodes if a.op == "get_attr")
    return owners
