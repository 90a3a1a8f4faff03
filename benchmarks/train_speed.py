"""Training-step time of dense vs pruned models: does a pruned model fine-tune as much faster as it runs?

Each model (obafx.bench.models, random weights) is pruned with ``compile_prune(model, x, macs=--budget)``
(default importance) in each of ``--variants`` (benchmarks/train_variants.py): "pruned" (defaults), "round<N>"
(round_to=N), "uniform" (uniform=True), and "ideal", not pruned but the same architecture built with every width
times sqrt(budget) (ResNets, VGG-BN), the MAC-ideal control. One SGD step (forward, cross-entropy, backward,
optimizer step; batch ``--batch``, 1x32x32 inputs) of the dense model and of every variant is timed in
ALTERNATION (order reversed every round), eager, with and without channels_last (obafx.bench.channels_last: the
torch bug's conv shape runs contiguous), on the wall clock and on this process's CPU time (which leaves out the
time other jobs hold a shared core). Medians over ``--rounds`` rounds of ``--steps`` steps each; speed-up = dense
median / variant median, beside the MAC ratio (thop), the MAC ratio with every channel count rounded up to 16
(what AVX-512 oneDNN kernels compute), and the inference speed-up at the same batch, timed the same way.
``--profile`` adds a torch.profiler breakdown of one step by op category (conv forward/backward, BatchNorm, ReLU,
add, copies/reorders, optimizer).

Usage: python3 benchmarks/train_speed.py [--models resnet20,resnet56,vgg_bn,vit_tiny] [--budget 0.5]
       [--variants pruned,round8,ideal] [--profile] [--batch 128] [--rounds 5] [--steps 3] [--threads 1]
       [--formats contiguous,channels_last] [--quick] [--reduced "why"] [--out benchmarks/results/train_speed.json]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import obafx
from obafx.bench import channels_last as CL
from obafx.bench import models

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import machine_info, write_json  # noqa: E402
import train_variants as parts  # noqa: E402

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
    p.add_argument("--variants", default="pruned,round8,ideal",
                   help="beside dense: pruned, uniform, round<N> (round_to=N), ideal (all widths x sqrt(budget))")
    p.add_argument("--profile", action="store_true", help="add a torch.profiler per-op breakdown to every row")
    p.add_argument("--reduced", default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: resnet20 at width 4, batch 8, 1 round")
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.batch, args.rounds, args.steps = "resnet20", 8, 1, 1
    args.models = [m for m in args.models.split(",") if m]
    args.formats = [f for f in args.formats.split(",") if f]
    args.variants = [v for v in args.variants.split(",") if v]
    for v in args.variants:
        try:
            parts.variant_kwargs(v)
        except ValueError as exc:
            p.error(str(exc))
    bad = [m for m in args.models if m not in models.MODELS] + [f for f in args.formats
                                                               if f not in ("contiguous", "channels_last")]
    if bad or not 0 < args.budget < 1 or min(args.batch, args.rounds, args.steps, args.threads) < 1:
        p.error(f"bad --models/--formats {bad}, --budget in (0, 1), --batch/--rounds/--steps/--threads >= 1")
    return args


def step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, fmt: str) -> Callable[[], None]:
    """One SGD step of ``model`` (train mode) on (x, y) in memory format ``fmt`` (the model is converted)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    if fmt == "channels_last":
        CL.enter(model)
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        model.train()  # every call: the same model also runs inference (eval mode) in the same benchmark
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def infer_fn(model: torch.nn.Module, x: torch.Tensor, fmt: str) -> Callable[[], None]:
    """One no-grad forward of ``model`` (eval mode) on ``x`` in memory format ``fmt`` (after step_fn converted
    the model)."""
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)

    def run():
        model.eval()
        with torch.no_grad():
            model(x)
    return run


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: leaves out time other jobs hold the core


def alternate(fns: Dict[str, Callable[[], None]], rounds: int, steps: int) -> Dict[str, Dict[str, List[float]]]:
    """Per-round medians of ``steps`` timed calls of each callable, in alternation (order reversed every round),
    on both clocks: {clock: {key: [median per round]}}."""
    for f in fns.values():
        f()  # warm-up: allocator, oneDNN primitives
    per = {c: {k: [] for k in fns} for c in CLOCKS}
    keys = list(fns)
    for r in range(rounds):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            times = {c: [] for c in CLOCKS}
            for _ in range(steps):
                start = {c: clock() for c, clock in CLOCKS.items()}
                fns[k]()
                for c, clock in CLOCKS.items():
                    times[c].append(clock() - start[c])
            for c in CLOCKS:
                per[c][k].append(statistics.median(times[c]))
    return per


def build_nets(name: str, args) -> Tuple[Dict[str, torch.nn.Module], torch.Tensor, torch.Tensor]:
    """The dense model ``name`` and every variant of ``args.variants`` that applies to it, and the batch (x, y)."""
    torch.manual_seed(0)
    kw = {"width": 4} if args.quick else {}
    dense = models.build(name, **kw)
    x, y = torch.randn(args.batch, 1, 32, 32), torch.randint(0, 10, (args.batch,))
    nets = {"dense": dense}
    for v in args.variants:
        net = parts.build_variant(name, v, dense, x, args.budget, kw)
        if net is not None:
            nets[v] = net
    return nets, x, y


def block(name: str, args) -> List[Dict[str, Any]]:
    """Rows of one model, one per (memory format, variant): the dense model and every variant, each in every
    format (its own copy), timed in ONE alternation (training steps, then inference), so that variants and
    formats compare on the same footing; each row against the dense medians of its format."""
    nets, x, y = build_nets(name, args)
    counts = {k: (parts.thop_total(m, x[:1]), *parts.padded_macs(m, x[:1])) for k, m in nets.items()}
    copies = {(f, k): copy.deepcopy(m) for f in args.formats for k, m in nets.items()}
    steps = {key: step_fn(m, x, y, key[0]) for key, m in copies.items()}
    train = alternate(steps, args.rounds, args.steps)
    infer = alternate({key: infer_fn(m, x, key[0]) for key, m in copies.items()}, args.rounds, args.steps)
    ops = {key: parts.op_breakdown(s) for key, s in steps.items()} if args.profile else {}
    rows = []
    for fmt, v in copies:
        if v == "dense":
            continue
        d, p = (fmt, "dense"), (fmt, v)
        r = {"model": name, "format": fmt, "variant": v, "batch": args.batch,
             "mac_ratio": counts["dense"][0] / counts[v][0],
             "conv_mac_ratio": counts["dense"][1] / counts[v][1],
             "padded16_mac_ratio": counts["dense"][2] / counts[v][2],
             "widths": [m.out_channels for m in nets[v].modules() if isinstance(m, torch.nn.Conv2d)]}
        for clock, suffix in (("wall", ""), ("cpu", "_cpu")):
            for kind, t in (("train", train[clock]), ("infer", infer[clock])):
                td, tp = statistics.median(t[d]), statistics.median(t[p])
                r.update({f"{kind}_dense_s{suffix}": td, f"{kind}_pruned_s{suffix}": tp,
                          f"{kind}_speedup{suffix}": td / tp})
        r.update({"train_rounds_s": {"dense": train["wall"][d], v: train["wall"][p]},
                  "infer_rounds_s": {"dense": infer["wall"][d], v: infer["wall"][p]},
                  "train_rounds_s_cpu": {"dense": train["cpu"][d], v: train["cpu"][p]}})
        if ops:
            r["op_ms"] = {"dense": ops[d], "pruned": ops[p]}
        rows.append(r)
    return rows


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = []
    try:
        for name in args.models:
            for r in block(name, args):
                rows.append(r)
                print(f"{name} {r['format']} {r['variant']}: train {r['train_speedup']:.2f}x "
                      f"(cpu {r['train_speedup_cpu']:.2f}x), inference {r['infer_speedup']:.2f}x "
                      f"(cpu {r['infer_speedup_cpu']:.2f}x), MACs {r['mac_ratio']:.2f}x, "
                      f"16-padded MACs {r['padded16_mac_ratio']:.2f}x", flush=True)
    finally:
        torch.set_num_threads(threads_before)
    out = {"machine": {**machine_info(), "threads": args.threads}, "reduced": args.reduced,
           "protocol": {"rounds": args.rounds, "steps_per_round": args.steps, "threads": args.threads,
                        "statistic": "median of per-round medians, dense and all variants in all formats "
                                     "alternating; SGD step = zero_grad + forward + cross-entropy + backward + step",
                        "clocks": "*_s / *_speedup: wall clock (perf_counter); *_cpu: this process's CPU time "
                                  "(process_time), which leaves out the time other jobs hold the core"},
           "settings": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows,
           "runtime_s": time.perf_counter() - start}
    write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
