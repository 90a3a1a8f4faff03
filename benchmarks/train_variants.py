"""Helpers of benchmarks/train_speed.py: the variants it times beside the dense model, their MAC counts (true
and padded to the CPU kernels' channel block), and a per-op breakdown of one SGD step from torch.profiler.

Why padded MACs: on an AVX-512 CPU oneDNN computes a convolution in blocks of 16 channels (nChw16c for
contiguous tensors; brgconv's 16/32/64 output-channel blocks and the 16x16 weight blocks of the weight gradient
for channels_last), and pads a width that is not a multiple of the block (ONEDNN_VERBOSE=1 shows the 'p'
flag and e.g. aBcd16b for a 19-channel tensor). A convolution pruned from 16 to 14 channels then costs what 16
did; ``padded_macs`` counts that.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

import obafx
from obafx.bench import models
from obafx.passes.macs import thop_macs

IDEAL_WIDTHS = {"resnet20": "width", "resnet56": "width", "vgg_bn": "cfg"}  # models the 'ideal' variant scales


def variant_kwargs(variant: str) -> Optional[Dict[str, Any]]:
    """compile_prune keyword arguments of a pruned variant name, or None for "ideal" (not pruned: the same
    architecture built with every width scaled). "pruned": defaults; "uniform": uniform=True; "round<N>":
    round_to=N (groups at most N wide still prune freely); "round<N>keep": round_to=N, keep_narrow=True
    (groups at most N wide left whole, since a narrower width pads back to N in the kernels). Raises ValueError on other names."""
    if variant == "pruned":
        return {}
    if variant == "uniform":
        return {"uniform": True}
    m = re.fullmatch(r"round(\d+)(keep)?", variant)
    if m and int(m.group(1)) > 1:
        n = int(m.group(1))
        return {"round_to": n, "keep_narrow": True} if m.group(2) else {"round_to": n}
    if variant == "ideal":
        return None
    raise ValueError(f"unknown variant {variant!r}: use pruned, uniform, round<N>, round<N>keep (N > 1) or ideal")


def build_variant(name: str, variant: str, dense: nn.Module, x: torch.Tensor, budget: float,
                  model_kw: Dict[str, Any]) -> Optional[nn.Module]:
    """The model of ``variant``: ``dense`` pruned by compile_prune to ``budget`` of its MACs, or for "ideal" the
    architecture ``name`` rebuilt with every width times sqrt(budget) (None where the model has no width knob)."""
    kw = variant_kwargs(variant)
    if kw is not None:
        return obafx.compile_prune(dense.eval(), x[:1], macs=budget, **kw)
    if name not in IDEAL_WIDTHS:
        return None
    scale = math.sqrt(budget)
    torch.manual_seed(0)
    if IDEAL_WIDTHS[name] == "width":
        return models.build(name, **{**model_kw, "width": max(1, round(model_kw.get("width", 16) * scale))})
    cfg = [v if v == "M" else max(1, round(v * scale)) for v in models.VGG_CFG]
    return models.build(name, **{**model_kw, "cfg": cfg})


def padded_macs(model: nn.Module, x: torch.Tensor, block: int = 16) -> Tuple[float, float]:
    """(MACs, MACs with every Conv2d/Linear channel count rounded up to ``block``) of one forward on ``x``,
    counted from the layers' output sizes (Conv2d and Linear only: what the padding applies to)."""
    ceil = lambda c: block * math.ceil(c / block)  # noqa: E731
    totals = [0.0, 0.0]

    def hook(m: nn.Module, args: Tuple[Any, ...], out: torch.Tensor) -> None:
        if isinstance(m, nn.Conv2d):
            per_out = out.numel() / m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            cin, cout = m.in_channels // m.groups, m.out_channels
        else:
            per_out, cin, cout = out.numel() / m.out_features, m.in_features, m.out_features
        totals[0] += per_out * cin * cout
        totals[1] += per_out * ceil(cin) * ceil(cout)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return totals[0], totals[1]


def thop_total(model: nn.Module, x: torch.Tensor) -> float:
    """thop's MAC count of ``model`` on ``x`` (what compile_prune's macs= budget counts)."""
    return thop_macs(model.eval(), (x,))[0]


# aten op (self time) -> category; the first matching pattern wins
OP_CATEGORIES = (
    ("conv_backward", r"convolution_backward"),
    ("conv_forward", r"mkldnn_convolution|slow_conv|thnn_conv|_nnpack|conv_depthwise"),
    ("batchnorm", r"batch_norm"),
    ("relu", r"relu|clamp_min|threshold_backward"),
    ("add", r"^aten::add_?$"),
    ("copy_reorder", r"copy_|to_dense|to_mkldnn|contiguous|clone"),
    ("matmul", r"addmm|^aten::mm$|bmm|matmul|linear"),
)


def op_breakdown(step: Callable[[], None], steps: int = 2) -> Dict[str, float]:
    """Milliseconds per call of ``step`` by op category from torch.profiler's self CPU time over ``steps``
    profiled calls after one warm-up call: "optimizer" for everything under Optimizer.step/zero_grad (SGD's
    per-parameter add_/mul_ on CPU), else OP_CATEGORIES by op name, else "other". The profiler's overhead
    inflates small ops."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    out: Counter = Counter()
    for e in prof.events():
        out[_category(e)] += e.self_cpu_time_total / steps / 1000.0
    return {k: round(v, 2) for k, v in sorted(out.items())}


def _category(event: Any) -> str:
    """The category of a profiler event: "optimizer" if it runs under an Optimizer record, else by op name."""
    parent = event
    while parent is not None:
        if parent.name.startswith("Optimizer."):
            return "optimizer"
        parent = parent.cpu_parent
    return next((c for c, pat in OP_CATEGORIES if re.search(pat, event.name)), "other")
