"""Is the speed-up real? Latency and throughput of dense versus obafx-pruned models, eager and torch.compile.

Each model is pruned with ``obafx.compile_prune(model, x, macs=1/2)`` and ``macs=1/3`` (importance "magnitude";
resnet50 also at 1/2 with ``round_to=8`` and ``16``; vit_b_16 also at 1/2 of FlopCounterMode's count,
``counter="flops"``, which counts attention's matmuls that thop leaves out). Dense and pruned variants are timed in ALTERNATION (order
rotated every round) so a slow burst of this shared machine hits all alike; numbers are medians over ``--reps``
rounds, compared only as ratios within one run (speed-up = dense median / pruned median), on the wall clock
(headline) and on process CPU time (with one thread it ignores the time other jobs hold the core).

Inputs: resnet50, mobilenet_v2 (torchvision) at 3x128x128 (224 is too slow on 2 loaded cores), vit_b_16 at
3x224x224 (fixed by its position embedding), obafx.bench.models resnet20, vgg_bn, vit_tiny at 1x32x32 (trained weights
from benchmarks/cache when present, else random). Latency: batch 1; throughput: batch 64 (32 for resnet50 and
mobilenet_v2, 4 for vit_b_16, for time). ``--threads`` 1 by default: 2 threads on the 2 shared cores made
resnet50 10-40x slower (OpenMP spin-waits). torch.compile (inductor, dynamic=False) costs 1-2 min per model and
shape here: it runs for ``--compile-models`` only, starting no compile after ``--compile-budget`` seconds
(failures, timeouts and skips are recorded). resnet50 also gets a layer profile (where the time goes).

Usage: python3 benchmarks/throughput.py [--models resnet50,...] [--quick] [--reps 7] [--no-compile]
       [--compile-models resnet50] [--compile-budget 720] [--threads 1] [--no-profile] [--update] [--out PATH]
Writes JSON (default benchmarks/results/throughput.json) and a PNG beside it (speed-up vs MAC ratio, y = x).
Target: on the CPU, resnet50 at 2x fewer MACs reaches a speed-up of at least 0.8x its MAC ratio.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import signal
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import obafx
from obafx.bench import models as obafx_models, train as tr
from obafx.passes.macs import param_count, thop_macs

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import machine_info, write_json  # noqa: E402
from throughput_profile import profile  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "results", "throughput.json")
# name -> (source, input shape without batch, throughput batch)
SPECS = {"resnet50": ("torchvision", (3, 128, 128), 32), "mobilenet_v2": ("torchvision", (3, 128, 128), 32),
         "vit_b_16": ("torchvision", (3, 224, 224), 4), "resnet20": ("obafx", (1, 32, 32), 64),
         "vgg_bn": ("obafx", (1, 32, 32), 64), "vit_tiny": ("obafx", (1, 32, 32), 64)}
DEFAULT_MODELS = ("resnet50", "mobilenet_v2", "vit_b_16", "resnet20", "vgg_bn", "vit_tiny")
DEFAULT_COMPILE = ("resnet50",)
TARGET = {"model": "resnet50", "budget": 0.5, "min_speedup_over_mac_ratio": 0.8}
ROUND_SECONDS = 0.05  # a round times a model this long at least (several calls for tiny models; median of them)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated, from " + ",".join(SPECS))
    p.add_argument("--quick", action="store_true", help="smoke run: resnet20 only, 3 rounds, batch 8, no compile")
    p.add_argument("--reps", type=int, default=7, help="alternation rounds (medians over rounds)")
    p.add_argument("--no-compile", action="store_true", help="eager only")
    p.add_argument("--compile-models", default=",".join(DEFAULT_COMPILE), help="models also timed compiled")
    p.add_argument("--compile-budget", type=float, default=720.0, help="seconds of compiling, then skip the rest")
    p.add_argument("--compile-timeout", type=int, default=400, help="seconds for one model's compile")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (recorded)")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip resnet50's layer profile")
    p.add_argument("--update", action="store_true",
                   help="keep the rows of the models not run from the existing --out file (a partial rerun)")
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    args.models = ["resnet20"] if args.quick else [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in SPECS]
    if unknown or args.reps < 1 or args.threads < 1:
        p.error(f"bad --models {unknown} (use {sorted(SPECS)}), --reps or --threads (both must be >= 1)")
    if args.quick:
        args.reps, args.no_compile = min(args.reps, 3), True
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.compile_models = [] if args.no_compile else [m for m in args.compile_models.split(",") if m]
    return args


def variants(name: str) -> List[Dict[str, Any]]:
    """(MAC fraction kept, round_to[, counter]) variants pruned for ``name``; resnet50 adds round_to variants at 2x
    (second: they go before 3x into the compile budget), vit_b_16 a 2x budget counted by FlopCounterMode."""
    extra = [{"budget": 1 / 2, "round_to": 8}, {"budget": 1 / 2, "round_to": 16}] if name == "resnet50" else []
    if name == "vit_b_16":  # thop leaves out attention's matmuls: also ask for half of FlopCounterMode's count
        extra = [{"budget": 1 / 2, "round_to": 1, "counter": "flops"}]
    return [{"budget": 1 / 2, "round_to": 1}, *extra, {"budget": 1 / 3, "round_to": 1}]


def build(name: str) -> Dict[str, Any]:
    """The dense model in eval mode and where its weights come from (random, or obafx's trained cache)."""
    if SPECS[name][0] == "torchvision":
        return {"model": getattr(torchvision.models, name)(weights=None).eval(), "weights": "random"}
    key = tr.cache_key(name, tr.DEFAULT_EPOCHS[name], 0, {}, tr.TRAIN_DEFAULTS.get(name, {}), {"batch_size": 128})
    cache = os.path.join(HERE, "cache")
    if os.path.isfile(os.path.join(cache, key + ".pt")):  # trained() would TRAIN on a miss: only load hits
        return {"model": tr.trained(name, cache_dir=cache, progress=False).eval(), "weights": f"cache:{key}"}
    torch.manual_seed(0)
    return {"model": obafx_models.build(name).eval(), "weights": "random"}


def flop_macs(model: torch.nn.Module, x: torch.Tensor) -> float:
    """FlopCounterMode MACs (FLOPs / 2) with autograd ON: under no_grad nn.MultiheadAttention takes its fused
    fast path (_native_multi_head_attention), which FlopCounterMode does not count (obafx.passes.macs.
    flop_counter_macs misses vit_b_16's attention that way: 11.3 G instead of 16.8 G MACs)."""
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2.0


def counts(model: torch.nn.Module, x: torch.Tensor) -> Dict[str, float]:
    return {"macs_thop": thop_macs(model, (x,))[0], "macs_flopcounter": flop_macs(model, x),
            "params": param_count(model)}


def prune_all(name: str, dense: torch.nn.Module, x: torch.Tensor) -> List[Dict[str, Any]]:
    """Every variant of ``name``: the pruned module, its counts, pruning seconds and the masking-oracle error."""
    out = []
    for v in variants(name):
        start = time.perf_counter()
        pruned = obafx.compile_prune(dense, x, macs=v["budget"], importance="magnitude", round_to=v["round_to"],
                                     counter=v.get("counter", "thop"))
        out.append({**v, "label": label(v), "module": pruned.eval(), "prune_s": time.perf_counter() - start,
                    "masked_error": obafx.report(pruned).masked_error, **counts(pruned, x)})
    return out


def label(v: Dict[str, Any]) -> str:
    return (f"{1 / v['budget']:.0f}x" + (f"-r{v['round_to']}" if v["round_to"] > 1 else "")
            + (f"-{v['counter']}" if v.get("counter", "thop") != "thop" else ""))


def timed(fn: Callable[[], Any], calls: int, device: str) -> Tuple[float, float, float]:
    """Median wall and median process-CPU seconds of ``calls`` consecutive calls of ``fn``, and the mean minor
    page faults per call. With one thread the CPU time is the work done while this process held a core: it
    stays steady when other jobs take the core away (wall time then grows 2-4x here). Page faults show the
    allocator handing big activations back to the OS and faulting them in again on every call."""
    wall, cpu, faults = [], [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        w, c = time.perf_counter(), time.process_time()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / calls
    return statistics.median(wall), statistics.median(cpu), faults


def alternate(fns: Dict[str, Callable[[], Any]], rounds: int, device: str) -> Dict[str, Dict[str, List[float]]]:
    """{label: {"wall"|"cpu"|"faults": [...]}}: per-round medians, the callables taking turns (order rotated every
    round). Tiny models get several calls per round (ROUND_SECONDS of work at least) so that timer and scheduler
    noise average out; the caller warmed every callable up."""
    calls = {k: max(1, min(50, math.ceil(ROUND_SECONDS / max(timed(f, 1, device)[0], 1e-6)))) for k, f in fns.items()}
    per = {k: {"wall": [], "cpu": [], "faults": []} for k in fns}
    keys = list(fns)
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            for key, value in zip(("wall", "cpu", "faults"), timed(fns[k], calls[k], device)):
                per[k][key].append(value)
    return per


def compile_all(mods: Dict[str, torch.nn.Module], shapes: List[torch.Tensor], state: Dict[str, float],
                timeout: int) -> Dict[str, Dict[str, Any]]:
    """torch.compile each module and run it once per input shape (that is the compile, under inference_mode
    like the timing, so no guard fails later); {label: {fn or error, compile_s}}. Once state["left"] seconds
    of compile budget are spent, no new compile starts ("skipped")."""
    out = {}
    for k, m in mods.items():
        if state["left"] <= 0:
            out[k] = {"error": "skipped: --compile-budget used up", "compile_s": None}
            continue
        start = time.perf_counter()
        try:
            fn = torch.compile(m, dynamic=False)
            with _alarm(timeout), torch.inference_mode():
                for x in shapes:
                    fn(x)
            out[k] = {"fn": fn, "compile_s": time.perf_counter() - start}
        except Exception as e:  # noqa: BLE001 - any compiler failure is a result to record, not a crash
            out[k] = {"error": f"{type(e).__name__}: {str(e)[:300]}", "compile_s": time.perf_counter() - start}
        state["left"] -= time.perf_counter() - start
    return out


@contextlib.contextmanager
def _alarm(seconds: int):
    """Raise TimeoutError in the main thread after ``seconds`` (POSIX SIGALRM, like ``resource`` above)."""
    def fire(*_):
        raise TimeoutError(f"compile took more than {seconds} s (--compile-timeout)")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def measure(fns: Dict[str, Callable], x1: torch.Tensor, xb: torch.Tensor, rounds: int) -> Dict[str, Dict]:
    """Batch-1 and batch-B times of every callable, alternating: {label: {"lat"|"batch": alternate()'s}}."""
    with torch.inference_mode():
        for f in fns.values():  # warm-up: allocator, oneDNN primitive caches
            f(x1), f(xb)
        lat = alternate({k: (lambda f=f: f(x1)) for k, f in fns.items()}, rounds, str(x1.device))
        bat = alternate({k: (lambda f=f: f(xb)) for k, f in fns.items()}, rounds, str(xb.device))
    return {k: {"lat": lat[k], "batch": bat[k]} for k in fns}


def make_row(name: str, mode: str, dense: Dict, v: Dict, times: Dict[str, Dict], batch: int,
             compile_info: Dict[str, Dict], device: str) -> Dict[str, Any]:
    """One result row: counts before/after, medians, speed-ups (dense median / pruned median) and efficiency."""
    row = {"model": name, "budget": v["budget"], "budget_label": label(v), "round_to": v["round_to"],
           "counter": v.get("counter", "thop"), "mode": mode,
           "device": device, "input_shape": list(SPECS[name][1]), "batch_throughput": batch,
           "weights": dense["weights"], "prune_s": v["prune_s"], "masked_error": v["masked_error"]}
    for key in ("macs_thop", "macs_flopcounter", "params"):
        row[f"{key}_dense"], row[f"{key}_pruned"] = dense[key], v[key]
    for key in ("thop", "flopcounter"):
        row[f"mac_ratio_{key}"] = dense[f"macs_{key}"] / v[f"macs_{key}"]
    row["compile_s_dense"], row["compile_s_pruned"] = (compile_info.get(k, {}).get("compile_s")
                                                       for k in ("dense", v["label"]))
    errors = [f"{k}: {compile_info[k]['error']}" for k in ("dense", v["label"]) if "error" in compile_info.get(k, {})]
    row["error"] = "; ".join(errors) or None
    if row["error"]:
        return row
    d, p = times["dense"], times[v["label"]]
    for clock, sfx in (("wall", ""), ("cpu", "_cpu")):  # same fields for both clocks, e.g. latency_dense_cpu_s
        for side, t in (("dense", d), ("pruned", p)):
            row[f"latency_{side}{sfx}_s"] = statistics.median(t["lat"][clock])
            row[f"throughput_{side}{sfx}"] = batch / statistics.median(t["batch"][clock])
            row[f"latency_rounds_{side}{sfx}_s"] = t["lat"][clock]
            row[f"batch_rounds_{side}{sfx}_s"] = t["batch"][clock]
            row[f"faults_per_batch_{side}"] = statistics.median(t["batch"]["faults"])  # minor page faults
        row[f"speedup_latency{sfx}"] = row[f"latency_dense{sfx}_s"] / row[f"latency_pruned{sfx}_s"]
        row[f"speedup_throughput{sfx}"] = row[f"throughput_pruned{sfx}"] / row[f"throughput_dense{sfx}"]
        for kind in ("latency", "throughput"):
            row[f"speedup_{kind}{sfx}_over_mac_ratio"] = row[f"speedup_{kind}{sfx}"] / row["mac_ratio_flopcounter"]
    # paired: median of per-round ratios (a burst inside one round cancels); a check on the main number
    row["speedup_throughput_paired"] = statistics.median(a / b for a, b in zip(d["batch"]["wall"], p["batch"]["wall"]))
    return row


def run_model(name: str, args: argparse.Namespace, state: Dict[str, float]) -> Tuple[List, Optional[Dict]]:
    """Prune ``name`` into its variants, time eager (and compiled, if asked) in alternation: (rows, profile)."""
    shape, batch = SPECS[name][1], (8 if args.quick else SPECS[name][2])
    torch.manual_seed(0)
    x1, xb = torch.randn(1, *shape, device=args.device), torch.randn(batch, *shape, device=args.device)
    dense = build(name)
    dense.update(counts(dense["model"], x1))
    pruned = prune_all(name, dense["model"], x1)
    mods = {"dense": dense["model"], **{v["label"]: v["module"] for v in pruned}}
    mods = {k: m.to(args.device) for k, m in mods.items()}
    times = measure(mods, x1, xb, args.reps)
    rows = [make_row(name, "eager", dense, v, times, batch, {}, args.device) for v in pruned]
    if name in args.compile_models:
        info = compile_all(mods, [x1, xb], state, args.compile_timeout)
        fns = {k: i["fn"] for k, i in info.items() if "fn" in i}
        times = measure(fns, x1, xb, args.reps) if "dense" in fns else {}
        rows += [make_row(name, "compiled", dense, v, times, batch, info, args.device) for v in pruned]
    for r in rows:
        print(f"{name} {r['budget_label']} {r['mode']}: MAC ratio {r['mac_ratio_flopcounter']:.2f}, speed-up "
              f"{r.get('speedup_latency', math.nan):.2f} / {r.get('speedup_throughput', math.nan):.2f}", flush=True)
    if name != TARGET["model"] or not args.profile or args.device != "cpu":
        return rows, None
    return rows, {"batch_1": profile(mods, x1, args.reps), f"batch_{batch}": profile(mods, xb, args.reps)}


def target_check(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The issue's target on every timed resnet50 2x row (each round_to and mode), for each clock and batch."""
    out = []
    for r in (r for r in rows if r["model"] == TARGET["model"] and r["budget"] == TARGET["budget"]):
        if "speedup_throughput" in r:
            eff = {m: r[f"speedup_{m}_over_mac_ratio"] for m in ("latency", "throughput", "latency_cpu",
                                                                   "throughput_cpu")}
            out.append({"round_to": r["round_to"], "mode": r["mode"], "speedup_over_mac_ratio": eff,
                        "met": {m: e >= TARGET["min_speedup_over_mac_ratio"] for m, e in eff.items()}})
    return out


def plot(rows: List[Dict[str, Any]], path: str, device: str) -> None:
    """Measured speed-up (wall clock; left batch 1, right the throughput batch) against the FlopCounter MAC
    ratio, one point per model/budget/round_to/mode (o eager, s compiled), with y = x and the 0.8 target."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in rows if "speedup_throughput" in r]
    keys = ("mac_ratio_flopcounter", "speedup_latency", "speedup_throughput")
    top = 1.1 * max([3.2] + [r[k] for r in good for k in keys])
    fig, axes = plt.subplots(1, 2, figsize=(13, 6))
    color = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r["model"] for r in good))}  # one colour per model
    for ax, key, what in zip(axes, ("speedup_latency", "speedup_throughput"), ("latency, batch 1", "throughput")):
        ax.plot([0, top], [0, top], "k-", lw=1, label="y = x (speed-up = MAC ratio)")
        ax.plot([0, top], [0, 0.8 * top], "k:", lw=1, label="0.8 x MAC ratio (target)")
        for r in good:
            ax.scatter(r["mac_ratio_flopcounter"], r[key], marker="o" if r["mode"] == "eager" else "s", s=28,
                       c=color[r["model"]])
            ax.annotate(f"{r['model']} {r['budget_label']} {r['mode'][0]}", (r["mac_ratio_flopcounter"], r[key]),
                        fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set(xlim=(0, top), ylim=(0, top), xlabel="MAC ratio dense / pruned (FlopCounterMode)",
               ylabel="measured speed-up (dense / pruned median wall time)", title=f"{what} on {device}")
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def updated(path: str, report: Dict[str, Any], models: List[str]) -> Dict[str, Any]:
    """``report`` merged into the run already at ``path``: that run's rows and profiles of the other models stay,
    with its machine and settings, and this run is listed under "partial_reruns" (machine, settings, models)."""
    if not os.path.isfile(path):
        return report
    with open(path) as f:
        old = json.load(f)
    rerun = {"models": models, "machine": report["machine"], "settings": report["settings"],
             "runtime_s": report["runtime_s"]}
    return {**old, "rows": [r for r in old["rows"] if r["model"] not in models] + report["rows"],
            "profile": {**{k: v for k, v in old.get("profile", {}).items() if k not in models}, **report["profile"]},
            "partial_reruns": [*old.get("partial_reruns", []), rerun],
            "target": {**TARGET, "checks": target_check([r for r in old["rows"] if r["model"] not in models]
                                                         + report["rows"])}}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the benchmark (see the module docstring for ``argv``); writes the JSON and the PNG, returns the JSON."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start, state, rows, profiles = time.perf_counter(), {"left": args.compile_budget}, [], {}
    for name in args.models:
        new, prof = run_model(name, args, state)
        rows += new
        if prof:
            profiles[name] = prof
    machine = {**machine_info(), "threads": torch.get_num_threads(), "device_name": torch.cuda.get_device_name(0)
               if args.device == "cuda" else "cpu", "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    settings = {k: getattr(args, k) for k in ("models", "reps", "quick", "compile_models", "compile_budget",
                                              "compile_timeout", "threads")}
    report = {"machine": machine, "settings": {**settings, "compile_backend": "inductor, dynamic=False",
                                               "importance": "magnitude"},
              "target": {**TARGET, "checks": target_check(rows)}, "rows": rows, "profile": profiles,
              "runtime_s": time.perf_counter() - start}
    if args.update:
        report = updated(args.out, report, args.models)
    write_json(args.out, report)
    plot(rows, os.path.splitext(args.out)[0] + ".png", args.device)
    return report


if __name__ == "__main__":
    main()
