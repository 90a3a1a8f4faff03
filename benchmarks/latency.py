"""Speed-ups on request: does ``compile_prune(model, x, latency="2x")`` give a model that MEASURES 2x faster?

For every cell (model x batch x mode x requested speed-up) the model is pruned with ``latency="<r>x"``
(importance "magnitude", LatencyOptions with the cell's threads, mode and clock), then dense and pruned are timed
again, independently of the pruning loop, in alternation (order swapped every round, medians over
``--check-rounds`` rounds of ``--reps`` samples), on ``--clock`` and again on the other clock (wall / this process's
CPU time, recorded as speedup_<clock>_clock). A cell is "met" when that speed-up is within 10% of the request;
otherwise it says why: the pruning loop's own note (a budget it could not reach with the channel groups at hand),
an obafx error (the request is out of reach), or noise (the loop measured the request, the re-check did not).
The MAC ratio (thop) beside each speed-up shows how much pruning a speed-up took: a model whose batch-1 time is
mostly per-op overhead needs far more than a 2x MAC cut for 2x.

Models and inputs as in benchmarks/throughput.py: resnet50, mobilenet_v2 at 3x128x128 (throughput batch 32),
vit_b_16 at 3x224x224 (batch 4), obafx.bench.models.vit_tiny at 1x32x32 (batch 64); random weights (latency does
not depend on them). Layer latency tables are cached in benchmarks/cache/latency_tables.json across runs.

Usage: python3 benchmarks/latency.py [--models resnet50,mobilenet_v2,vit_b_16,vit_tiny] [--batches 1,throughput]
       [--modes eager,compile] [--requests 1.5,2,3] [--threads 1] [--clock wall|process] [--reps 5] [--rounds 5]
       [--check-rounds 9]
       [--reduced "why this run is smaller"] [--quick] [--out benchmarks/results/latency.json]
       python3 benchmarks/latency.py --merge A.json,B.json --out benchmarks/results/latency.json
         (no run: the cells of earlier runs in one file, a later run's cell replacing the same cell of an earlier
         one; every cell names its run, and ``runs`` keeps each run's protocol, settings, machine and note)
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torchvision

import obafx
from obafx.latency_timing import LatencyOptions, alternate
from obafx.passes.macs import param_count, thop_macs

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import error_entry, machine_info, obafx_commit, write_json  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "results", "latency.json")
CACHE = os.path.join(HERE, "cache", "latency_tables.json")
SPECS = {"resnet50": ("torchvision", (3, 128, 128), 32), "mobilenet_v2": ("torchvision", (3, 128, 128), 32),
         "vit_b_16": ("torchvision", (3, 224, 224), 4), "vit_tiny": ("obafx", (1, 32, 32), 64)}
DATA = ("no data set: random weights and random inputs of each model's shape (timing depends on shapes, not "
        "values)")
WITHIN = 0.10  # a cell is met when the re-measured speed-up is within 10% of the request


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(SPECS))
    p.add_argument("--batches", default="1,throughput", help="'1', 'throughput' (the model's batch) or numbers")
    p.add_argument("--modes", default="eager,compile")
    p.add_argument("--requests", default="1.5,2,3", help="speed-ups to ask for")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", default="wall", choices=("wall", "process"),
                   help="process: this process's CPU time (1 thread; leaves out other jobs' time on a shared CPU)")
    p.add_argument("--reps", type=int, default=5, help="samples per timing (median)")
    p.add_argument("--rounds", type=int, default=5, help="alternation rounds inside the pruning loop")
    p.add_argument("--check-rounds", type=int, default=9, help="alternation rounds of the independent re-check")
    p.add_argument("--cell-timeout", type=int, default=1800, help="seconds for one cell (compiles are slow)")
    p.add_argument("--reduced", default=None, help="say why this run is smaller than the full one (recorded)")
    p.add_argument("--quick", action="store_true", help="smoke run: vit_tiny, batch 1, eager, 1.5x, 1 round")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--merge", default=None, help="comma-separated result files to merge into --out (no run)")
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.batches, args.modes, args.requests = "vit_tiny", "1", "eager", "1.5"
        args.reps, args.rounds, args.check_rounds = 1, 1, 1
    args.models = [m for m in args.models.split(",") if m]
    args.modes = [m for m in args.modes.split(",") if m]
    args.requests = [float(r) for r in args.requests.split(",") if r]
    args.batches = [b for b in args.batches.split(",") if b]
    bad = [m for m in args.models if m not in SPECS] + [m for m in args.modes if m not in ("eager", "compile")]
    if bad or any(r <= 1 for r in args.requests) or min(args.threads, args.reps, args.rounds, args.check_rounds) < 1:
        p.error(f"bad --models/--modes {bad} (models: {sorted(SPECS)}; modes: eager, compile), --requests must be "
                "> 1 and --threads/--reps/--rounds/--check-rounds >= 1")
    return args


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if SPECS[name][0] == "torchvision":
        return getattr(torchvision.models, name)(weights=None).eval()
    from obafx.bench import models

    return models.build(name).eval()


def batch_of(name: str, b: str) -> int:
    return SPECS[name][2] if b == "throughput" else int(b)


def cell(name: str, model: torch.nn.Module, x: torch.Tensor, mode: str, request: float, args,
         timer: Optional[Callable]) -> Dict[str, Any]:
    """Prune ``model`` to ``request``x its measured latency, re-measure, and say whether and why not."""
    row: Dict[str, Any] = {"model": name, "batch": int(x.shape[0]), "input_shape": list(x.shape[1:]), "mode": mode,
                           "requested_speedup": request}
    opts = LatencyOptions(threads=args.threads, mode=mode, reps=args.reps, rounds=args.rounds, timer=timer,
                          clock=args.clock, cache="" if timer else CACHE, progress=args.progress)
    start = time.perf_counter()
    try:
        pruned = obafx.compile_prune(model, x, latency=f"{request}x", latency_options=opts)
    except obafx.ObafxError as exc:
        return {**row, "status": "unreachable", "why": f"{type(exc).__name__}: {exc}",
                "prune_s": time.perf_counter() - start}
    except Exception as exc:  # noqa: BLE001 - a crash is a result to record, not the end of the run
        return {**row, **error_entry(exc), "prune_s": time.perf_counter() - start}
    rep = obafx.report(pruned)
    row["prune_s"] = time.perf_counter() - start
    row["loop"] = rep.latency["measured"]
    row["loop_speedup"] = row["loop"]["speedup"]
    check = alternate(model, pruned, (x,), _replace(opts, rounds=args.check_rounds), desc=f"{name} re-check")
    row["check"] = check
    row["speedup"] = check["speedup"]
    other = {"wall": "process", "process": "wall"}[args.clock]
    if timer is None and (other == "wall" or args.threads == 1):  # the same re-check on the other clock
        again = alternate(model, pruned, (x,), _replace(opts, rounds=args.check_rounds, clock=other))
        row[f"speedup_{other}_clock"] = again["speedup"]
    row["mac_ratio"] = rep.macs_before / rep.macs_after
    row["params_ratio"] = param_count(model) / param_count(pruned)
    row["notes"] = list(rep.notes)
    row["kernel_blocks"] = rep.latency.get("kernel_blocks")  # layers per detected kernel block (1: none)
    row["status"], row["why"] = verdict(request, row)
    return row


def timed_cell(name: str, model, x, mode: str, request: float, args, timer) -> Dict[str, Any]:
    """``cell`` under SIGALRM after ``--cell-timeout`` seconds (a timeout is recorded, the run goes on)."""
    def fire(*_):
        raise TimeoutError(f"the cell took more than {args.cell_timeout} s (--cell-timeout)")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(args.cell_timeout)
    try:
        return cell(name, model, x, mode, request, args, timer)
    except TimeoutError as exc:
        return {"model": name, "batch": int(x.shape[0]), "mode": mode, "requested_speedup": request,
                **error_entry(exc), "status": "timeout"}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def verdict(request: float, row: Dict[str, Any]):
    """("met", None) when the re-measured speed-up is within WITHIN of the request, else ("missed", why)."""
    if abs(row["speedup"] / request - 1) <= WITHIN:
        return "met", None
    if abs(row["loop_speedup"] / request - 1) <= WITHIN:  # first: the loop met it, the re-check is the outlier
        spread = lambda key: "-".join(f"{v:.3g}" for v in row["check"][key])  # noqa: E731
        return "missed", (f"noise: the pruning loop measured {row['loop_speedup']:.2f}x, the re-check "
                          f"{row['speedup']:.2f}x (per-round spreads: dense {spread('dense_spread_s')} s, pruned "
                          f"{spread('pruned_spread_s')} s)")
    missed = [n for n in row["notes"] if "missed" in n]
    if row["speedup"] < request and row["mac_ratio"] > 2 * request:
        return "missed", (f"overhead-bound: the result has {row['mac_ratio']:.1f}x fewer MACs but runs only "
                          f"{row['speedup']:.2f}x faster; the time that does not shrink with channels (per-op "
                          f"overhead at batch {row['batch']}) bounds the speed-up" + (f" ({missed[0]})" if missed
                                                                                      else ""))
    if missed:
        return "missed", missed[0]
    return "missed", f"the pruning loop ended at {row['loop_speedup']:.2f}x without a note (tolerance wider than 10%?)"


def _replace(opts: LatencyOptions, **kw) -> LatencyOptions:
    from dataclasses import replace

    return replace(opts, **kw)


def main(argv: Optional[List[str]] = None, timer: Optional[Callable] = None) -> Dict[str, Any]:
    """Run the cells and write the JSON (again after every cell: a stopped run keeps what it measured);
    ``timer`` (tests) replaces the wall clock everywhere."""
    args = parse_args(argv)
    if args.merge:
        out = merge([p for p in args.merge.split(",") if p])
        write_json(args.out, out)
        return out
    start = time.perf_counter()
    cells: List[Dict[str, Any]] = []
    for name in args.models:
        model = build(name)
        for b in args.batches:
            x = torch.randn(batch_of(name, b), *SPECS[name][1])
            macs = thop_macs(model, (x,))[0]
            for mode in args.modes:
                for request in args.requests:
                    row = timed_cell(name, model, x, mode, request, args, timer)
                    row["macs_dense"] = macs
                    cells.append(row)
                    measured = f"{row['speedup']:.2f}x " if "speedup" in row else ""
                    print(f"{name} batch {row['batch']} {mode} {request}x: {row.get('status')} {measured}"
                          f"{row.get('why') or ''}", flush=True)
                    write_json(args.out, report(args, cells, start, timer))
    out = report(args, cells, start, timer)
    write_json(args.out, out)
    return out


def report(args: argparse.Namespace, cells: List[Dict[str, Any]], start: float, timer) -> Dict[str, Any]:
    """The JSON: machine, protocol, settings, the cells so far and how many met their request."""
    return {"data": DATA, "machine": {**machine_info(), "threads": args.threads}, "obafx_commit": obafx_commit(),
            "protocol": {"within": WITHIN, "reps": args.reps, "rounds": args.rounds, "check_rounds": args.check_rounds,
                         "threads": args.threads, "statistic": "median of per-round medians, dense and pruned in "
                         "alternation (order swapped every round); speed-up = dense / pruned",
                         "clock": args.clock, "timer": "injected (test)" if timer else
                         {"wall": "wall clock", "process": "process CPU time"}[args.clock]},
            "reduced": args.reduced, "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "cells": cells, "met": sum(c.get("status") == "met" for c in cells), "total": len(cells),
            "runtime_s": time.perf_counter() - start}

def merge(paths: List[str]) -> Dict[str, Any]:
    """The cells of the result files at ``paths`` in one report. A cell is (model, batch, mode, request); a later
    file's cell replaces an earlier one's. Each cell gets ``run`` (an index into ``runs``: the protocol, settings,
    machine, note and source file of the run that measured it; a merged input keeps its own runs) and its verdict
    again from its recorded numbers (verdict() as it is now); the top level takes the last run's protocol and
    machine, and ``reduced`` joins every run's note."""
    runs: List[Dict[str, Any]] = []
    cells: Dict[tuple, Dict[str, Any]] = {}
    for path in paths:
        with open(path) as fh:
            data = json.load(fh)
        recorded = ("machine", "protocol", "settings", "reduced", "runtime_s", "obafx_commit")
        own = data.get("runs") or [{**{k: data.get(k) for k in recorded}, "source": os.path.basename(path)}]
        for c in data["cells"]:
            key = (c["model"], c["batch"], c["mode"], c["requested_speedup"])
            cells[key] = {**c, "run": len(runs) + c.get("run", 0)}
            if "speedup" in c and "loop_speedup" in c:  # a measured cell: its verdict by today's rule
                cells[key]["status"], cells[key]["why"] = verdict(c["requested_speedup"], c)
        runs.extend(own)
    rows = list(cells.values())
    last = runs[-1]
    return {"data": DATA, "machine": last["machine"], "protocol": last["protocol"],
            "reduced": " | ".join(f"run {i} ({r['source']}): {r['reduced'] or 'full'}" for i, r in enumerate(runs)
                                  if any(c["run"] == i for c in rows)),
            "runs": runs, "cells": rows, "met": sum(c.get("status") == "met" for c in rows), "total": len(rows)}


if __name__ == "__main__":
    main()
