"""Timing for latency budgets: the options (device, dtype, threads, eager/compiled), one timer, and the two
measurements the budget needs: layers alone on a grid of widths, and dense vs candidate end to end in alternation.

Timing is noisy (shared machines, turbo, caches): every number is a median over repetitions, and the end-to-end
comparison times dense and candidate in alternation (order swapped every round) so a slow burst hits both.
A ``timer(module, inputs) -> seconds`` in the options replaces the wall clock (tests inject a deterministic one).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from obafx.passes.errors import ConfigError
from obafx.passes.latency_blocks import DEFAULT_CANDIDATES, detect_block, probe_widths
from obafx.passes.latency_model import LayerSpec, LayerTable, grid_widths

Timer = Callable[[nn.Module, Tuple[Any, ...]], float]
MIN_SAMPLE_S = 0.002  # a wall-clock sample lasts this long at least (several calls of a fast module)
MAX_CALLS = 100
DEFAULT_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "obafx",
                             "latency.json")


@dataclass(frozen=True)
class LatencyOptions:
    """How a latency budget is measured. The batch size is the example input's.

    ``device``: where to time ("cpu", "cuda", "cuda:1"); ``dtype``: the floating dtype to time in (None: the
    example's); ``threads``: torch intra-op threads while timing (None: as set); ``mode``: "eager" or "compile"
    (torch.compile, inductor); ``reps``: calls per timing (median), after ``warmup`` calls; ``rounds``: dense /
    candidate alternations per end-to-end measurement (median); ``grid``: fractions of each layer's widths its
    table is measured at; ``tolerance``: how far (relative) the measured latency may be from the target; ``cache``:
    the tables' JSON file ('' = no cache); ``timer``: ``timer(module, inputs) -> seconds`` of one call instead of
    the clock; ``clock``: "wall" (default) or "process" (this process's CPU time: on a CPU shared with other jobs it
    leaves out the time they hold the core; needs device "cpu" and threads=1); ``progress``: tqdm bars while
    measuring; ``candidates``: at most this many candidates per step are built and timed end to end (each costs
    ``rounds`` alternations, and a compile in "compile" mode); ``blocks``: the kernel block sizes each prunable
    layer width is probed for (timed at and just above a block edge, passes/latency_blocks.py): where the cost is
    a step function of the width, the cost model pads widths to the block and the selector keeps whole blocks
    (() = no probing: a plain grid)."""

    device: str = "cpu"
    dtype: Optional[torch.dtype] = None
    threads: Optional[int] = None
    mode: str = "eager"
    reps: int = 10
    warmup: int = 2
    rounds: int = 5
    grid: Tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    tolerance: float = 0.05
    cache: str = DEFAULT_CACHE
    timer: Optional[Timer] = None
    clock: str = "wall"
    progress: bool = True
    candidates: int = 8
    blocks: Tuple[int, ...] = DEFAULT_CANDIDATES

    def __post_init__(self):
        if self.mode not in ("eager", "compile"):
            raise ConfigError(f"LatencyOptions(mode={self.mode!r}). What to do: use 'eager' or 'compile'.")
        for name in ("reps", "rounds", "threads", "candidates"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"LatencyOptions({name}={v!r}). What to do: pass a positive integer.")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"LatencyOptions(warmup={self.warmup!r}). What to do: pass an integer >= 0.")
        if not self.grid or any(not (0.0 < f <= 1.0) for f in self.grid):
            raise ConfigError(f"LatencyOptions(grid={self.grid!r}). What to do: pass fractions in (0, 1], e.g. "
                              "(0.25, 0.5, 0.75, 1.0).")
        if not (0.0 < self.tolerance < 1.0):
            raise ConfigError(f"LatencyOptions(tolerance={self.tolerance}). What to do: pass e.g. 0.05 (5%).")
        if self.dtype is not None and not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise ConfigError(f"LatencyOptions(dtype={self.dtype!r}). What to do: pass a floating torch dtype, "
                              "e.g. torch.float16, or None for the example input's.")
        if not isinstance(self.blocks, tuple) or any(isinstance(b, bool) or not isinstance(b, int) or b < 2
                                                      for b in self.blocks):
            raise ConfigError(f"LatencyOptions(blocks={self.blocks!r}). What to do: pass a tuple of block sizes "
                              ">= 2 to probe for, e.g. (8, 16, 32), or () for none.")
        check_device(self.device)
        if self.clock not in ("wall", "process"):
            raise ConfigError(f"LatencyOptions(clock={self.clock!r}). What to do: use 'wall' or 'process'.")
        if self.clock == "process" and (torch.device(self.device).type != "cpu" or self.threads != 1):
            raise ConfigError("LatencyOptions(clock='process') measures this process's CPU time, which is latency "
                              "only on the CPU with one thread. What to do: pass device='cpu', threads=1, or use "
                              "clock='wall'.")

    def key_parts(self, inputs: Tuple[Any, ...]) -> Dict[str, Any]:
        """What measured numbers depend on (the cache key): device, torch, dtype, threads, mode, timer, shapes."""
        timer = self.clock if self.timer is None else getattr(self.timer, "__qualname__", type(self.timer).__name__)
        return {"device": device_name(self.device), "torch": torch.__version__, "dtype": str(_dtype(self, inputs)),
                "threads": self.threads or torch.get_num_threads(), "mode": self.mode, "timer": timer,
                "blocks": list(self.blocks), "inputs": [list(x.shape) for x in inputs if isinstance(x, torch.Tensor)]}


def check_device(device: str) -> torch.device:
    """``device`` as a torch.device; ConfigError when it is not there to time on."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"LatencyOptions(device={device!r}) is not a device ({exc}). What to do: pass 'cpu' or "
                          "'cuda'.") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count(),
                 "mps": torch.backends.mps.is_available()}.get(dev.type, False)
    if not available:
        raise ConfigError(f"LatencyOptions(device={device!r}): no such device is available on this machine, so "
                          "latency cannot be measured there. What to do: time on 'cpu', or run on a machine with "
                          "that device.")
    return dev


def device_name(device: str) -> str:
    """The device as the cache and report name it: the card for CUDA, the processor for the CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev.index or 0)}"
    return f"cpu:{_cpu_model()}:{os.cpu_count()}"


def _cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else the platform's processor or machine string."""
    import platform

    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux: fall back to what platform knows
        pass
    return platform.processor() or platform.machine()


def _dtype(opts: LatencyOptions, inputs: Tuple[Any, ...]) -> torch.dtype:
    if opts.dtype is not None:
        return opts.dtype
    floats = [x.dtype for x in inputs if isinstance(x, torch.Tensor) and x.is_floating_point()]
    return floats[0] if floats else torch.get_default_dtype()


@contextlib.contextmanager
def threads(n: Optional[int]) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside the block (unchanged for None)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def placed(module: nn.Module, inputs: Tuple[Any, ...], opts: LatencyOptions):
    """A private eval-mode copy of ``module`` and the inputs on the options' device and dtype (compiled in
    "compile" mode): (callable module, inputs). The caller's module is not touched."""
    dtype = _dtype(opts, inputs)
    moved = copy.deepcopy(module).to(device=opts.device, dtype=dtype).eval()
    args = tuple(x.to(device=opts.device, dtype=dtype if x.is_floating_point() else x.dtype)
                 if isinstance(x, torch.Tensor) else x for x in inputs)
    if opts.mode == "compile" and opts.timer is None:
        moved = torch.compile(moved, dynamic=False)
    return moved, args


def median_call(module: nn.Module, args: Tuple[Any, ...], opts: LatencyOptions) -> float:
    """Median seconds of one call of ``module(*args)`` over ``opts.reps`` samples after ``opts.warmup`` calls."""
    return Sampler(module, args, opts).median()


class Sampler:
    """Times one placed module. The first ``median()`` warms it up (``opts.warmup`` calls) and, on a clock, sets
    how many consecutive calls one sample averages (enough to last MIN_SAMPLE_S: a layer that runs in
    microseconds is otherwise timer and scheduler noise); later calls (alternation rounds) only sample."""

    def __init__(self, module: nn.Module, args: Tuple[Any, ...], opts: LatencyOptions):
        self.module, self.args, self.opts = module, args, opts
        self.calls: Optional[int] = None
        dev = torch.device(opts.device)
        self._sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
        self._now = time.perf_counter if opts.clock == "wall" else time.process_time

    def median(self) -> float:
        """Median seconds per call over ``opts.reps`` samples."""
        opts = self.opts
        if opts.timer is not None:
            return statistics.median(opts.timer(self.module, self.args) for _ in range(opts.reps))
        with torch.inference_mode():
            if self.calls is None:
                for _ in range(opts.warmup):
                    self._run(1)
                self.calls = max(1, min(MAX_CALLS, math.ceil(MIN_SAMPLE_S / max(self._run(1), 1e-7))))
            return statistics.median(self._run(self.calls) for _ in range(opts.reps))

    def _run(self, calls: int) -> float:
        self._sync()
        start = self._now()
        for _ in range(calls):
            self.module(*self.args)
        self._sync()
        return (self._now() - start) / calls


def alternate(dense: nn.Module, candidate: nn.Module, inputs: Tuple[Any, ...], opts: LatencyOptions,
              desc: str = "obafx timing", dense_placed: Optional[Tuple[Any, Tuple[Any, ...]]] = None,
              candidate_placed: Optional[Tuple[Any, Tuple[Any, ...]]] = None,
              earlier: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Dense and candidate timed in alternation (order swapped every round). Out: their medians over rounds,
    the ratio candidate / dense, the per-round values and spread (min, max) of each, and the protocol.
    ``dense_placed`` / ``candidate_placed``: placed(...) made earlier (a compiled module is compiled once);
    ``earlier``: a previous result for the same pair, whose rounds are pooled with these (a second look at a
    candidate is measured on twice the rounds, not replaced by one more noisy draw)."""
    with threads(opts.threads):
        pair = {"dense": Sampler(*(dense_placed or placed(dense, inputs, opts)), opts),
                "pruned": Sampler(*(candidate_placed or placed(candidate, inputs, opts)), opts)}
        per: Dict[str, list] = {"dense": [], "pruned": []}
        for r in tqdm(range(opts.rounds), desc=desc, disable=not opts.progress, leave=False):
            for name in (("dense", "pruned") if r % 2 == 0 else ("pruned", "dense")):
                per[name].append(pair[name].median())  # the first round also warms up
    if earlier is not None:
        per = {name: list(earlier[f"{name}_rounds_s"]) + values for name, values in per.items()}
    dense_s, pruned_s = statistics.median(per["dense"]), statistics.median(per["pruned"])
    return {"dense_s": dense_s, "pruned_s": pruned_s, "ratio": pruned_s / dense_s if dense_s > 0 else 1.0,
            "speedup": dense_s / pruned_s if pruned_s > 0 else float("inf"),
            "dense_spread_s": [min(per["dense"]), max(per["dense"])],
            "pruned_spread_s": [min(per["pruned"]), max(per["pruned"])],
            "dense_rounds_s": per["dense"], "pruned_rounds_s": per["pruned"],
            **protocol(replace(opts, rounds=len(per["dense"])), inputs)}


def protocol(opts: LatencyOptions, inputs: Tuple[Any, ...]) -> Dict[str, Any]:
    """How a measurement was made, for the report."""
    batch = next((int(x.shape[0]) for x in inputs if isinstance(x, torch.Tensor) and x.dim()), None)
    return {"device": device_name(opts.device), "dtype": str(_dtype(opts, inputs)), "mode": opts.mode,
            "threads": opts.threads or torch.get_num_threads(), "batch": batch, "rounds": opts.rounds,
            "reps": opts.reps, "warmup": opts.warmup, "statistic": "median of per-round medians, alternating",
            "timer": {"wall": "wall clock", "process": "process CPU time"}[opts.clock] if opts.timer is None
            else "custom timer"}


def standalone(spec: LayerSpec, in_width: int, out_width: int) -> Tuple[nn.Module, Tuple[torch.Tensor]]:
    """A fresh layer like ``spec`` at these widths, and a random input of its input shape at ``in_width``."""
    shape = list(spec.input_shape)
    if spec.kind == "linear":
        shape[-1] = in_width
        return nn.Linear(in_width, out_width, bias=spec.config[0]), (torch.randn(shape),)
    dims, kernel, stride, padding, dilation, bias = spec.config
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    shape[1] = in_width
    groups = in_width if spec.tied else 1
    return conv(in_width, out_width, kernel, stride, padding, dilation, groups, bias), (torch.randn(shape),)


def measure_tables(specs: Sequence[LayerSpec], opts: LatencyOptions, inputs: Tuple[Any, ...]) -> Dict[str, LayerTable]:
    """Each distinct layer's seconds on its grid of widths (signature -> table), one tqdm bar over all points.
    Each prunable dim is first probed for a kernel block (``opts.blocks``); its grid then sits on block edges."""
    jobs = {s.signature(): s for s in specs}
    probes = sum(len(probe_widths(w, opts.blocks)) for s in jobs.values() for _, w, _ in s.prunable_dims())
    grid = sum(_count(s, opts.grid) for s in jobs.values())
    bar = tqdm(total=probes + grid, desc="obafx layer latency grid", disable=not opts.progress, leave=False)
    tables = {}
    like = _like(opts, inputs)

    def seconds(spec: LayerSpec, i: int, o: int) -> float:
        layer, args = standalone(spec, o if spec.tied else i, o)
        bar.update(1)
        return median_call(*placed(layer, args, like), opts)

    with threads(opts.threads), bar:
        for sig, spec in jobs.items():
            blocks = {side: detect_block(w, opts.blocks, _along(seconds, spec, side))
                      for side, w, _ in spec.prunable_dims()}
            in_block, out_block = blocks.get("in", 1), blocks.get("out", 1)
            ins, outs = _points(spec, opts.grid, in_block, out_block)
            bar.total += len(ins) * len(outs) - _count(spec, opts.grid)  # edges can merge grid points
            rows = tuple(tuple(seconds(spec, i, o) for o in outs) for i in ins)
            tables[sig] = LayerTable(ins, outs, rows, in_block, out_block).monotone()
    return tables


def _count(spec: LayerSpec, grid: Sequence[float]) -> int:
    ins, outs = _points(spec, grid)
    return len(ins) * len(outs)


def _along(seconds: Callable[[LayerSpec, int, int], float], spec: LayerSpec, side: str) -> Callable[[int], float]:
    """Seconds as a function of one dim's width, the other at its full width (a tied layer moves both)."""
    if side == "out":
        return lambda w: seconds(spec, spec.in_width, w)
    return lambda w: seconds(spec, w, spec.out_width)


def _points(spec: LayerSpec, grid: Sequence[float], in_block: int = 1,
            out_block: int = 1) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    outs = grid_widths(spec.out_width, grid, spec.out_slot is not None, out_block)
    ins = (spec.in_width,) if spec.tied else grid_widths(spec.in_width, grid, spec.in_slot is not None, in_block)
    return ins, outs


def _like(opts: LatencyOptions, inputs: Tuple[Any, ...]) -> LatencyOptions:
    """The options with the dtype fixed to the model's timing dtype (layers are built in float32)."""
    return replace(opts, dtype=_dtype(opts, inputs))
