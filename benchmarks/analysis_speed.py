"""Analysis speed: obafx's trace + analyze + couple against Torch-Pruning's DependencyGraph, side by side.

For each model (torchvision, weights=None, eval, float32) both tools analyse the same model on the same input in
the same process, alternating, ``--reps`` times each, each run after a full garbage collection; the JSON holds wall-clock medians, every time, CPU-time
medians (process time: steadier than wall clock on a shared machine), the ratios obafx / Torch-Pruning, obafx's
per-stage medians (wall and CPU), what the model's private copy costs (trace.py's copy-on-write copy and a plain deep copy), and
torch.fx's own symbolic trace of the model alone (the floor under any fx-based analysis). Models: resnet50 and
densenet121 at 64x64 (small inputs, where Torch-Pruning's real forward pass is cheapest), vit_b_16 at 224x224, and
resnet50 and densenet121 again at their native 224x224 (keys ``name@224``): obafx's analysis runs on meta tensors, so
its time does not grow with the input, while Torch-Pruning's does (``--quick``: resnet18 and mobilenet_v3_small at
32x32). Target: ratio <= 1. ``settings`` records the default models a ``--models`` run left out and ``--note``
(e.g. what else was loading the machine); ``machine`` the load average at the start and at the end.

Usage: python3 benchmarks/analysis_speed.py [--reps 7] [--models resnet50,...] [--quick] [--threads 1] [--note TEXT]
       [--out PATH]
Writes JSON (default benchmarks/results/analysis_speed.json).
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
import warnings
from typing import Any, Dict, List, Optional

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, write_json  # noqa: E402
from obafx.passes.trace import private_copy  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "analysis_speed.json")
MODELS = {"resnet50": 64, "densenet121": 64, "vit_b_16": 224, "resnet50@224": 224, "densenet121@224": 224}
QUICK_MODELS = {"resnet18": 32, "mobilenet_v3_small": 32}


def obafx_analysis(model: torch.nn.Module, x: torch.Tensor) -> Dict[str, Any]:
    """obafx's trace, analyze and couple on ``model``; returns each stage's seconds and the group count."""
    from obafx.passes.channel_graph import analyze
    from obafx.passes.coupling import couple
    from obafx.passes.trace import trace

    c0, t0 = time.process_time(), time.perf_counter()
    traced = trace(model, x)
    c1, t1 = time.process_time(), time.perf_counter()
    facts = analyze(traced)
    c2, t2 = time.process_time(), time.perf_counter()
    coupling = couple(facts)
    c3, t3 = time.process_time(), time.perf_counter()
    return {"trace": t1 - t0, "analyze": t2 - t1, "couple": t3 - t2, "total": t3 - t0, "cpu": c3 - c0,
            "cpu_trace": c1 - c0, "cpu_analyze": c2 - c1, "cpu_couple": c3 - c2,
            "groups": len(coupling.groups), "barriers": len(coupling.barriers)}


def tp_analysis(model: torch.nn.Module, x: torch.Tensor) -> Dict[str, Any]:
    """Torch-Pruning's DependencyGraph.build_dependency on ``model``; returns seconds and its group count."""
    import torch_pruning as tp

    c0, t0 = time.process_time(), time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TP warns about parameters it cannot attribute (ViT's class token)
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"total": total, "cpu": cpu, "groups": sum(1 for _ in dg.get_all_groups())}


def fx_trace_alone(model: torch.nn.Module) -> Dict[str, float]:
    """Seconds (wall, CPU) of torch.fx's own symbolic trace of ``model`` (no copy, no shapes): the floor for any
    fx-based tool."""
    c0, start = time.process_time(), time.perf_counter()
    torch.fx.Tracer().trace(model)
    return {"total": time.perf_counter() - start, "cpu": time.process_time() - c0}


def bench_model(name: str, size: int, reps: int) -> Dict[str, Any]:
    """Both analyses on one model, alternating so that machine load hits both alike; medians and raw times.
    ``name`` may carry its input size as ``name@size`` (the same model measured at a second size)."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name.partition("@")[0], weights=None).eval()
    x = torch.randn(1, 3, size, size)
    obafx_analysis(model, x)  # warm-up: first calls pay for imports and lazy initialisation
    tp_analysis(model, x)
    timed = {"obafx": lambda: obafx_analysis(model, x), "torch_pruning": lambda: tp_analysis(model, x),
             "fx_alone": lambda: fx_trace_alone(model)}
    results: Dict[str, List[Any]] = {key: [] for key in timed}
    for _ in range(reps):
        for key, run in timed.items():
            gc.collect()  # both tools leave reference cycles: nobody's timing pays for collecting the other's
            results[key].append(run())
    fx_alone = results.pop("fx_alone")
    runs: Dict[str, List[Dict[str, Any]]] = results
    entry: Dict[str, Any] = {"input": [1, 3, size, size], "params": sum(p.numel() for p in model.parameters())}
    for tool, rows in runs.items():
        entry[tool] = {"median_s": statistics.median(r["total"] for r in rows), "times_s": [r["total"] for r in rows],
                       "cpu_median_s": statistics.median(r["cpu"] for r in rows), "groups": rows[-1]["groups"]}
    entry["obafx"]["stages_median_s"] = {k: statistics.median(r[k] for r in runs["obafx"])
                                         for k in ("trace", "analyze", "couple")}
    entry["obafx"]["stages_cpu_median_s"] = {k: statistics.median(r[f"cpu_{k}"] for r in runs["obafx"])
                                             for k in ("trace", "analyze", "couple")}
    entry["obafx"]["barriers"] = runs["obafx"][-1]["barriers"]
    entry["fx_trace_alone_median_s"] = statistics.median(r["total"] for r in fx_alone)
    entry["fx_trace_alone_cpu_median_s"] = statistics.median(r["cpu"] for r in fx_alone)
    for key, copier in (("deepcopy_cpu_s", copy.deepcopy), ("private_copy_cpu_s", private_copy)):
        start = time.process_time()
        copier(model)  # what trace.py's private copy costs (copy-on-write) against a plain deep copy
        entry["obafx"][key] = time.process_time() - start
    entry["ratio_obafx_over_tp"] = entry["obafx"]["median_s"] / entry["torch_pruning"]["median_s"]
    entry["cpu_ratio_obafx_over_tp"] = entry["obafx"]["cpu_median_s"] / entry["torch_pruning"]["cpu_median_s"]
    entry["meets_target"] = entry["ratio_obafx_over_tp"] <= 1.0
    return entry


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7, help="timed repetitions per tool and model (median reported)")
    p.add_argument("--models", default=None,
                   help="comma-separated torchvision names, each optionally with its input size as name@size "
                        "(default size 224 for vit/swin/maxvit, else 64; 32 with --quick)")
    p.add_argument("--quick", action="store_true", help="two small models at 32x32 (smoke test)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared machine, idle OpenMP threads spin and inflate every time)")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON output path")
    p.add_argument("--note", default="", help="free text stored in the JSON's settings (e.g. how loaded the "
                                               "machine was, why models were left out)")
    return p.parse_args(argv)


def _selected(args: argparse.Namespace) -> Dict[str, int]:
    if args.models:
        return {m: _input_size(m, args.quick) for m in args.models.split(",") if m}
    return dict(QUICK_MODELS if args.quick else MODELS)


def _input_size(spec: str, quick: bool) -> int:
    """The input size of a ``--models`` entry: ``name@size``, else 224 for transformers, else 64 (32 quick)."""
    name, _, size = spec.partition("@")
    if size:
        return int(size)
    return 224 if name.startswith(("vit", "swin", "maxvit")) else 32 if quick else 64


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the benchmark; returns the report that was written to ``--out``."""
    args = parse_args(argv)
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(before)


def _run(args: argparse.Namespace) -> Dict[str, Any]:
    selected = _selected(args)
    defaults = QUICK_MODELS if args.quick else MODELS
    report: Dict[str, Any] = {
        "machine": machine_info(),
        "settings": {"reps": args.reps, "quick": args.quick, "dtype": "float32", "warmup": 1, "threads": args.threads,
                     "models_left_out": [m for m in defaults if m not in selected], "note": args.note},
        "models": {},
    }
    for name, size in selected.items():
        entry = bench_model(name, size, args.reps)
        report["models"][name] = entry
        ob, tp = entry["obafx"], entry["torch_pruning"]
        print(f"{name:20s} obafx {ob['median_s']:.3f}s (cpu {ob['cpu_median_s']:.3f}s)  tp {tp['median_s']:.3f}s "
              f"(cpu {tp['cpu_median_s']:.3f}s)  ratio {entry['ratio_obafx_over_tp']:.2f}", flush=True)
    report["all_meet_target"] = all(e["meets_target"] for e in report["models"].values())
    report["machine"]["load_avg_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
