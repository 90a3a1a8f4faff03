"""Cost of one CPU training kernel as a function of its channel count: why a pruned ResNet-20 does not train as
much faster as its MACs say.

Times, for each channel count C, a 3x3 convolution C -> C (forward + backward: input and weight gradients) and a
BatchNorm2d over C channels (train mode, forward + backward) on a (batch, C, side, side) input, in contiguous
and channels_last format, at the shapes of ResNet-20's stages (128 x 32x32 at 4-16 channels, 128 x 16x16 at
16-32). Every (op, format, C) is timed ``--reps`` times (median) per round, the channel counts in alternating
order over ``--rounds`` rounds (median of rounds), on this process's CPU time (time.process_time: the machine may
be shared). Each row gives ms and ms per (C*C for the convolution, C for BatchNorm) relative to the widest C of
its shape: 1.0 means the kernel's cost scales with the work, above 1.0 it pays for padding or tails.

Usage: python3 benchmarks/kernel_widths.py [--batch 128] [--rounds 3] [--reps 5] [--threads 1]
       [--out benchmarks/results/kernel_widths.json]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import machine_info, write_json  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "results", "kernel_widths.json")
SHAPES = {32: (4, 6, 8, 11, 12, 14, 16), 16: (16, 17, 19, 22, 24, 28, 30, 32)}  # side -> channel counts
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def kernel(op: str, c: int, side: int, batch: int, fmt: str) -> Callable[[], None]:
    """One forward + backward of ``op`` ("conv3x3" or "batchnorm") over ``c`` channels in memory format ``fmt``."""
    torch.manual_seed(c)
    mod = nn.Conv2d(c, c, 3, padding=1, bias=False) if op == "conv3x3" else nn.BatchNorm2d(c).train()
    mod = mod.to(memory_format=FORMATS[fmt])
    x = torch.randn(batch, c, side, side).contiguous(memory_format=FORMATS[fmt]).requires_grad_()
    grad = torch.randn_like(mod(x))

    def run():
        x.grad = None
        mod.zero_grad(set_to_none=True)
        mod(x).backward(grad)
    return run


def sweep(batch: int, rounds: int, reps: int) -> List[Dict[str, Any]]:
    """Rows {op, format, side, channels, ms, rounds_ms, cost_per_work}: median over rounds of the median of
    ``reps`` timed calls (process CPU time), channel counts alternating in order every round."""
    rows = []
    for op in ("conv3x3", "batchnorm"):
        for fmt in FORMATS:
            for side, chans in SHAPES.items():
                fns = {c: kernel(op, c, side, batch, fmt) for c in chans}
                per = {c: [] for c in chans}
                for f in fns.values():
                    f()  # warm-up: oneDNN primitive creation, allocator
                for r in range(rounds):
                    for c in (chans if r % 2 == 0 else chans[::-1]):
                        times = []
                        for _ in range(reps):
                            start = time.process_time()
                            fns[c]()
                            times.append(time.process_time() - start)
                        per[c].append(statistics.median(times) * 1e3)
                work = (lambda c: c * c) if op == "conv3x3" else (lambda c: c)
                widest = max(chans)
                ref = statistics.median(per[widest]) / work(widest)
                for c in chans:
                    ms = statistics.median(per[c])
                    rows.append({"op": op, "format": fmt, "side": side, "channels": c, "ms": ms,
                                 "rounds_ms": per[c], "cost_per_work": ms / work(c) / ref})
                    print(f"{op:9s} {fmt:13s} {side}x{side} C={c:3d}: {ms:7.2f} ms, cost per work "
                          f"{ms / work(c) / ref:.2f}", flush=True)
    return rows


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reduced", default=None)
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if min(args.batch, args.rounds, args.reps, args.threads) < 1:
        p.error("--batch, --rounds, --reps and --threads must be >= 1")
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        rows = sweep(args.batch, args.rounds, args.reps)
    finally:
        torch.set_num_threads(before)
    out = {"machine": {**machine_info(), "threads": args.threads}, "reduced": args.reduced,
           "settings": {k: v for k, v in vars(args).items() if k != "out"},
           "protocol": "forward + backward per call; median of reps per round, median of rounds; process CPU time; "
                       "cost_per_work = (ms / work) / (ms / work of the widest C of the same op, format, side), "
                       "work = C*C (conv) or C (BatchNorm)",
           "rows": rows, "runtime_s": time.perf_counter() - start}
    write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
