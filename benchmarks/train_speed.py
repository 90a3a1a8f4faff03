"""Training-step time of dense vs pruned models: does a pruned model fine-tune as much faster as it runs?

Each model (obafx.bench.models, random weights) is pruned with ``compile_prune(model, x, macs=--budget)``
(importance "magnitude"); then one SGD step (forward, cross-entropy, backward, optimizer step; batch ``--batch``,
1x32x32 inputs) of the dense and of the pruned model is timed in ALTERNATION (order swapped every round), eager,
with and without channels_last (obafx.bench.channels_last: the torch bug's conv shape runs contiguous). Medians
over ``--rounds`` rounds of ``--steps`` steps each; speed-up = dense median / pruned median, beside the MAC ratio
(thop) and the inference speed-up at the same batch, timed the same way, so the two can be compared.

Usage: python3 benchmarks/train_speed.py [--models resnet20,resnet56,vgg_bn,vit_tiny] [--budget 0.5]
       [--batch 128] [--rounds 5] [--steps 3] [--threads 1] [--formats contiguous,channels_last] [--quick]
       [--reduced "why"] [--out benchmarks/results/train_speed.json]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import obafx
from obafx.bench import channels_last as CL
from obafx.bench import models

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import machine_info, write_json  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "results", "train_speed.json")


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet20,resnet56,vgg_bn,vit_tiny")
    p.add_argument("--budget", type=float, default=0.5, help="macs= fraction kept")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round (median)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--formats", default="contiguous,channels_last")
    p.add_argument("--reduced", default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: resnet20 at width 4, batch 8, 1 round")
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.batch, args.rounds, args.steps = "resnet20", 8, 1, 1
    args.models = [m for m in args.models.split(",") if m]
    args.formats = [f for f in args.formats.split(",") if f]
    bad = [m for m in args.models if m not in models.MODELS] + [f for f in args.formats
                                                               if f not in ("contiguous", "channels_last")]
    if bad or not 0 < args.budget < 1 or min(args.batch, args.rounds, args.steps, args.threads) < 1:
        p.error(f"bad --models/--formats {bad}, --budget in (0, 1), --batch/--rounds/--steps/--threads >= 1")
    return args


def step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, fmt: str) -> Callable[[], None]:
    """One SGD step of ``model`` (train mode) on (x, y) in memory format ``fmt``."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    if fmt == "channels_last":
        CL.enter(model)
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def infer_fn(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run():
        with torch.no_grad():
            model(x)
    return run


def alternate(fns: Dict[str, Callable[[], None]], rounds: int, steps: int) -> Dict[str, List[float]]:
    """Per-round medians of ``steps`` timed calls of each callable, in alternation (order swapped every round)."""
    for f in fns.values():
        f()  # warm-up: allocator, oneDNN primitives
    per = {k: [] for k in fns}
    keys = list(fns)
    for r in range(rounds):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                fns[k]()
                times.append(time.perf_counter() - start)
            per[k].append(statistics.median(times))
    return per


def row(name: str, args, fmt: str) -> Dict[str, Any]:
    torch.manual_seed(0)
    kw = {"width": 4} if args.quick else {}
    dense = models.build(name, **kw)
    x, y = torch.randn(args.batch, 1, 32, 32), torch.randint(0, 10, (args.batch,))
    pruned = obafx.compile_prune(dense.eval(), x[:1], macs=args.budget)
    rep = obafx.report(pruned)
    train = alternate({"dense": step_fn(dense, x, y, fmt), "pruned": step_fn(pruned, x, y, fmt)},
                      args.rounds, args.steps)
    infer = alternate({"dense": infer_fn(dense.eval(), x), "pruned": infer_fn(pruned.eval(), x)},
                      args.rounds, args.steps)
    med = {f"{kind}_{side}_s": statistics.median(t[side]) for kind, t in (("train", train), ("infer", infer))
           for side in ("dense", "pruned")}
    return {"model": name, "format": fmt, "batch": args.batch, "mac_ratio": 1 / rep.macs_ratio, **med,
            "train_speedup": med["train_dense_s"] / med["train_pruned_s"],
            "infer_speedup": med["infer_dense_s"] / med["infer_pruned_s"],
            "train_rounds_s": train, "infer_rounds_s": infer}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = []
    try:
        for name in args.models:
            for fmt in args.formats:
                r = row(name, args, fmt)
                rows.append(r)
                print(f"{name} {fmt}: train {r['train_speedup']:.2f}x, inference {r['infer_speedup']:.2f}x, "
                      f"MACs {r['mac_ratio']:.2f}x", flush=True)
    finally:
        torch.set_num_threads(threads_before)
    out = {"machine": {**machine_info(), "threads": args.threads}, "reduced": args.reduced,
           "protocol": {"rounds": args.rounds, "steps_per_round": args.steps, "threads": args.threads,
                        "statistic": "median of per-round medians, dense and pruned alternating; SGD step = "
                                     "zero_grad + forward + cross-entropy + backward + step"},
           "settings": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows,
           "runtime_s": time.perf_counter() - start}
    write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
