"""Cost of OBA scoring against one plain gradient: time and peak memory, side by side in one run.

For a CIFAR ResNet-56 and a small ViT (patch 4, dim 192, depth 6, 3 heads) on a batch of 32x32 images and
10 classes, measures three operations on the same model and batch, all in eval mode:

- ``gradient``: forward + ``loss.backward()``, the baseline;
- ``full``: ``parameter_scores(model, [(x, y)], mode="full")`` (one exact HVP, forward-over-reverse);
- ``residual``: ``parameter_scores(..., mode="residual")`` (one forward + one HVP with the cotangent fixed);
- ``group_full`` / ``group_residual``: the group-exact score (importance="oba_group", one Rademacher probe):
  ``group_scores(model, coupling, [(x, y)], mode=...)``, the coupling computed once outside the measurement
  (compile_prune has it from the step's analysis); its index of units per parameter entry is built inside.

Peak memory: each (model, operation) runs once in its own fresh subprocess, so allocations of one cannot hide
in another's high-water mark; on CPU it is the run's peak resident set size above the resident size just
before it (Linux: reset the kernel's high-water mark through /proc/self/clear_refs, read VmHWM - VmRSS;
elsewhere ru_maxrss growth, which can only under-count). tracemalloc does not see torch's allocator, so it is
not used. On CUDA: torch.cuda.max_memory_allocated above the allocation before the run.
Time: one subprocess per model warms each operation up once, then runs ``--reps`` rounds of
gradient/full/residual interleaved, so a change in machine load hits all three alike; reported are the median
wall-clock and process-CPU times per operation and the ratios of both (on a shared machine the load averages
recorded in the JSON tell how far wall-clock times were inflated).

Usage: python3 benchmarks/hvp_cost.py [--reps 5] [--batch 128] [--threads N] [--quick] [--device cpu] [--out PATH]
Writes JSON (default benchmarks/results/hvp_cost.json). Targets: full <= 4x and residual <= 7x the gradient's
time, peak memory <= 4x; the group-exact score <= 1.2x the OBA score of the same mode (time and memory).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

OPS = ("gradient", "full", "residual", "group_full", "group_residual")
MODELS = ("resnet56", "vit")
TARGETS = {"full_time": 4.0, "residual_time": 7.0, "full_cpu": 4.0, "residual_cpu": 7.0, "full_mem": 4.0,
           "residual_mem": 4.0, **{f"group_{m}_vs_{m}_{k}": 1.2 for m in ("full", "residual")
                                   for k in ("time", "cpu", "mem")}}
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "hvp_cost.json")


# --------------------------------------------------------------------------------------- models (fallback)

class _Block(nn.Module):
    """CIFAR BasicBlock (conv-BN-ReLU-conv-BN + shortcut, ReLU); used only when obafx.models is missing."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.short(x))


class _ResNet(nn.Sequential):
    def __init__(self, n, width):
        layers, cin = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()], width
        for stage in range(3):
            for i in range(n):
                cout = width * 2 ** stage
                layers.append(_Block(cin, cout, 2 if stage and not i else 1))
                cin = cout
        super().__init__(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))


class _ViT(nn.Module):
    """Patch-embedding ViT with nn.TransformerEncoder-free pre-norm blocks written out by hand."""

    def __init__(self, dim, depth, heads, patch):
        super().__init__()
        self.embed, self.heads = nn.Conv2d(3, dim, patch, patch), heads
        self.pos = nn.Parameter(torch.randn(1, (32 // patch) ** 2, dim) * 0.02)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            n1=nn.LayerNorm(dim), qkv=nn.Linear(dim, 3 * dim), proj=nn.Linear(dim, dim), n2=nn.LayerNorm(dim),
            fc1=nn.Linear(dim, 4 * dim), fc2=nn.Linear(4 * dim, dim))) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        b, n, d = x.shape
        for blk in self.blocks:
            q, k, v = blk.qkv(blk.n1(x)).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            att = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
            x = x + blk.proj((att @ v).transpose(1, 2).reshape(b, n, d))
            x = x + blk.fc2(F.gelu(blk.fc1(blk.n2(x))))
        return self.head(self.norm(x).mean(1))


def model_source() -> str:
    """"obafx.models" when it provides CifarResNet/resnet56/ViT, else "local"; decided once per run so that
    every measurement uses the same architecture."""
    try:
        from obafx.bench import models
        return "obafx.models" if all(hasattr(models, n) for n in ("CifarResNet", "resnet56", "ViT")) else "local"
    except ImportError:
        return "local"


def build_model(name: str, quick: bool, source: str) -> nn.Module:
    """ResNet-56 or the ViT (tiny versions for --quick) from ``source``."""
    if source == "obafx.models":
        from obafx.bench import models
        if name == "resnet56":
            return models.CifarResNet(1, num_classes=10, in_ch=3, width=8) if quick else \
                models.resnet56(num_classes=10, in_ch=3)
        size = dict(dim=24, depth=1, heads=2, patch=8) if quick else dict(dim=192, depth=6, heads=3, patch=4)
        return models.ViT(num_classes=10, in_ch=3, img_size=32, mlp_ratio=4.0, **size)
    if name == "resnet56":
        return _ResNet(1, 8) if quick else _ResNet(9, 16)
    return _ViT(24, 1, 2, 8) if quick else _ViT(192, 6, 3, 4)


# ------------------------------------------------------------------------------------------------ worker

def _rss_kib(field: str) -> int:
    """VmRSS / VmHWM of this process in KiB (Linux), -1 when unavailable."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def _operation(op: str, model: nn.Module, x, y):
    """A zero-argument callable running one measured operation."""
    if op == "gradient":
        def run():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
        return run
    if op.startswith("group_"):
        from obafx.passes.channel_graph import analyze
        from obafx.passes.coupling import couple
        from obafx.passes.group_scores import group_scores
        from obafx.passes.trace import trace
        coupling = couple(analyze(trace(model, x[:2])))
        return lambda: group_scores(model, coupling, [(x, y)], mode=op[len("group_"):])
    from obafx.passes.hvp import parameter_scores
    return lambda: parameter_scores(model, [(x, y)], mode=op)


def _peak_memory_mib(run, device: str) -> tuple[float, str]:
    """Run once; (peak memory above the pre-run level in MiB, method used)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2 ** 20, "cuda.max_memory_allocated"
    if _reset_peak() and _rss_kib("VmRSS") > 0:
        before = _rss_kib("VmRSS")
        run()
        return (_rss_kib("VmHWM") - before) / 1024, "VmHWM-VmRSS after clear_refs"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, "ru_maxrss growth"


def _setup(name: str, batch: int, quick: bool, device: str, source: str):
    """(model in eval mode, x, y) with fixed seeds."""
    torch.manual_seed(0)
    model = build_model(name, quick, source)
    x = torch.randn(batch, 3, 32, 32, device=device)
    return model.to(device).eval(), x, torch.randint(0, 10, (batch,), device=device)


def memory_worker(name: str, op: str, batch: int, quick: bool, device: str, source: str) -> dict:
    """Peak memory of one run of ``op`` in this (fresh) process."""
    model, x, y = _setup(name, batch, quick, device, source)
    peak, method = _peak_memory_mib(_operation(op, model, x, y), device)
    return {"peak_mem_mib": peak, "mem_method": method, "params": sum(p.numel() for p in model.parameters())}


def _timed(run, device: str) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one run."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def timing_worker(name: str, batch: int, reps: int, quick: bool, device: str, source: str) -> dict:
    """Median times of every operation: one warm-up each, then ``reps`` interleaved rounds."""
    model, x, y = _setup(name, batch, quick, device, source)
    runs = {op: _operation(op, model, x, y) for op in OPS}
    for run in runs.values():
        run()
    samples: dict = {op: [] for op in OPS}
    for _ in range(reps):
        for op, run in runs.items():
            samples[op].append(_timed(run, device))
    return {op: {"time_s": statistics.median(w for w, _ in s), "cpu_s": statistics.median(c for _, c in s),
                 "times_s": [w for w, _ in s]} for op, s in samples.items()}


def _in_subprocess(args, *worker: str) -> dict:
    """Run a worker in a fresh interpreter and parse its JSON line (in this process for --quick, whose
    numbers only show that the script works)."""
    if args.quick:
        kind, name, *op = worker
        return memory_worker(name, op[0], args.batch, True, args.device, args.source) if kind == "memory" \
            else timing_worker(name, args.batch, args.reps, True, args.device, args.source)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", *worker, "--batch", str(args.batch),
           "--reps", str(args.reps), "--device", args.device, "--source", args.source, "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {worker} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_model(name: str, args) -> dict:
    """Memory (a process per operation) and timing (one process, interleaved) of one model."""
    ops = {op: _in_subprocess(args, "memory", name, op) for op in OPS}
    for op, times in _in_subprocess(args, "time", name).items():
        ops[op].update(times)
    return ops


# -------------------------------------------------------------------------------------------------- main

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement (median)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--quick", action="store_true",
                        help="tiny models, batch 4, 1 repetition, no subprocesses (smoke test only)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads per measurement (0: torch's default). 1 gives stable ratios on a "
                             "shared machine, where waiting OpenMP threads spin and inflate every time")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + str(MODELS))
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)  # memory MODEL OP | time MODEL
    parser.add_argument("--source", choices=("obafx.models", "local"), help=argparse.SUPPRESS)
    return parser


def _ratios(ops: dict) -> dict:
    """Wall-clock, process-CPU and peak-memory ratios of full and residual scoring to the gradient, and of the
    group-exact score to the OBA score of the same mode."""
    out = {}
    for op, base in (("full", "gradient"), ("residual", "gradient"), ("group_full", "full"),
                     ("group_residual", "residual")):
        name = op if base == "gradient" else f"{op}_vs_{base}"
        out[f"{name}_time"] = ops[op]["time_s"] / ops[base]["time_s"]
        out[f"{name}_cpu"] = ops[op]["cpu_s"] / max(ops[base]["cpu_s"], 1e-9)
        out[f"{name}_mem"] = ops[op]["peak_mem_mib"] / max(ops[base]["peak_mem_mib"], 1e-9)
    return out


def _load() -> list:
    """The 1/5/15-minute load averages (empty where the OS has none)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else []


def main(argv=None) -> dict:
    """Measure every model and operation, write the JSON report to ``--out`` and return it."""
    args = _parser().parse_args(argv)
    if args.quick:
        args.batch, args.reps = min(args.batch, 4), 1
    args.source = args.source or model_source()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.worker:
        kind, name, *op = args.worker
        result = memory_worker(name, op[0], args.batch, args.quick, args.device, args.source) \
            if kind == "memory" else timing_worker(name, args.batch, args.reps, args.quick, args.device, args.source)
        print(json.dumps(result))
        return {}
    report = {"machine": {"torch": torch.__version__, "python": platform.python_version(),
                          "platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "device": args.device,
                          "load_average_at_start": _load(),
                          "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda")
                          else platform.processor() or platform.machine()},
              "settings": {"batch": args.batch, "reps": args.reps, "quick": args.quick, "image": [3, 32, 32],
                           "model_source": args.source,
                           "classes": 10, "mode": "eval",
                           "isolated_processes": not args.quick},
              "targets": TARGETS, "models": {}}
    for name in args.models.split(","):
        ops = measure_model(name, args)
        ratios = _ratios(ops)
        report["models"][name] = {"ops": ops, "ratios": ratios,
                                  "meets_targets": {k: v <= TARGETS[k] for k, v in ratios.items()}}
        print(f"{name}: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()), file=sys.stderr)
    report["machine"]["load_average_at_end"] = _load()  # other work on the machine inflates wall-clock times
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as out:
        json.dump(report, out, indent=1)
    return report


if __name__ == "__main__":
    main()
