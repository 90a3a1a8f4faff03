"""Where a model's forward time goes, for benchmarks/throughput.py: CPU seconds, MACs and parameters per leaf-module
kind and per top-level child, by forward hooks (alternating between models, medians over rounds)."""
from __future__ import annotations

import collections
import resource
import statistics
import time
from typing import Any, Dict, Tuple

import torch

from obafx.passes.macs import thop_macs


def kind_of(mod: torch.nn.Module) -> str:
    """A layer's kind for the profile: conv{k}x{k} (+dw if depthwise, s{stride} if strided) or the class name."""
    if isinstance(mod, torch.nn.Conv2d):
        dw = "dw" if mod.groups > 1 and mod.groups == mod.in_channels else ""
        return f"conv{dw}{mod.kernel_size[0]}x{mod.kernel_size[1]}" + (f"s{mod.stride[0]}" if mod.stride[0] > 1 else "")
    return type(mod).__name__


def profile(mods: Dict[str, torch.nn.Module], x: torch.Tensor, rounds: int) -> Dict[str, Dict[str, Any]]:
    """Where each model's time goes on ``x`` (eager, alternating, medians over rounds): CPU seconds, thop MACs and
    parameters per leaf-module kind ("kind:conv3x3") and per top-level child ("stage:layer4"), forward hooks;
    "other" = total minus hooked (adds, flatten, the hooks' own cost); minor page faults and system seconds per
    forward; the share of conv widths that are not multiples of 8."""
    cur: Dict[str, Dict[str, float]] = {}
    handles, starts, tags = [], {}, {}
    for k, m in mods.items():
        for qual, mod in ((q, mod) for q, mod in m.named_modules() if q and not list(mod.children())):
            tags[id(mod)] = (f"kind:{kind_of(mod)}", f"stage:{qual.split('.')[0]}")

            def pre(mod_, _in):
                starts[id(mod_)] = time.process_time()

            def post(mod_, _in, _out, k=k):
                for tag in tags[id(mod_)]:
                    cur[k][tag] = cur[k].get(tag, 0.0) + time.process_time() - starts[id(mod_)]
            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    seen = {k: {"total": [], "faults": [], "sys": [], "parts": collections.defaultdict(list)} for k in mods}
    try:
        with torch.inference_mode():
            for r in range(rounds + 1):  # round 0 warms up
                for k, m in mods.items():
                    cur[k], r0, c0 = {}, resource.getrusage(resource.RUSAGE_SELF), time.process_time()
                    m(x)
                    c1, r1, s = time.process_time(), resource.getrusage(resource.RUSAGE_SELF), seen[k]
                    if r:
                        s["total"].append(c1 - c0)
                        s["faults"].append(r1.ru_minflt - r0.ru_minflt)
                        s["sys"].append(r1.ru_stime - r0.ru_stime)
                        for tag in set(cur[k]) | set(s["parts"]):
                            s["parts"][tag].append(cur[k].get(tag, 0.0))
    finally:
        for h in handles:
            h.remove()
    return {k: _profile_summary(m, x, seen[k], tags) for k, m in mods.items()}


def _profile_summary(m: torch.nn.Module, x: torch.Tensor, seen: Dict[str, Any], tags: Dict[int, Tuple]) -> Dict:
    """profile()'s medians for one model, with thop MACs and parameter counts added to every part."""
    parts = {t: {"cpu_s": statistics.median(v), "macs": 0.0, "params": 0} for t, v in seen["parts"].items()}
    mods = dict(m.named_modules())
    for qual, macs in thop_macs(m, (x,))[1].items():
        for tag in tags.get(id(mods.get(qual)), ()):
            parts.setdefault(tag, {"cpu_s": 0.0, "macs": 0.0, "params": 0})["macs"] += macs
    for qual, prm in m.named_parameters():
        stage = parts.setdefault(f"stage:{qual.split('.')[0]}", {"cpu_s": 0.0, "macs": 0.0, "params": 0})
        stage["params"] += prm.numel()
    total = statistics.median(seen["total"])
    parts["other"] = {"cpu_s": total - sum(v["cpu_s"] for t, v in parts.items() if t.startswith("kind:")),
                      "macs": 0.0, "params": 0}
    widths = [c.out_channels for c in m.modules() if isinstance(c, torch.nn.Conv2d)]
    return {"total_cpu_s": total, "minor_faults": statistics.median(seen["faults"]),
            "sys_s": statistics.median(seen["sys"]), "parts": parts,
            "conv_widths_not_multiple_of_8": sum(w % 8 != 0 for w in widths) / max(len(widths), 1)}
