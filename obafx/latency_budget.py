"""A latency budget for compile_prune: the cost model a step selects with, and the end-to-end measurement the
shared budget loop (passes/fit.py) corrects with.

Costs are fractions of the DENSE model's measured latency (1.0 = as slow as the model the user passed), so that
every step of an iterative run aims at ``fraction ** (step / steps)`` of the same thing. A candidate's cost is
measured with dense and candidate timed in alternation (obafx/latency_timing.alternate), a ratio of medians.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import replace
from typing import Any, Callable, Dict, Optional, Set, Tuple

import torch

from obafx.latency_timing import LatencyOptions, alternate, measure_tables, median_call, placed, threads
from obafx.passes.errors import ConfigError
from obafx.passes.latency_cache import load_tables, split_cached, store_tables
from obafx.passes.latency_model import LatencyModel, element_weights, layer_specs


def parse_latency(value: Any) -> float:
    """The fraction of the dense latency to keep: a number in (0, 1) as is, or a speed-up "2x" (or "2.5x") as
    1 / 2. ConfigError otherwise (a latency of 1 or more is no pruning; a speed-up of 1x or less neither)."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*[xX]\s*", value)
        if not match:
            raise ConfigError(f"latency={value!r} is not a speed-up. What to do: pass a fraction of the dense "
                              "latency to keep (latency=0.5) or a speed-up as a string (latency='2x').")
        speedup = float(match.group(1))
        if speedup <= 1.0:
            raise ConfigError(f"latency={value!r} asks for no speed-up. What to do: ask for more than 1x, e.g. "
                              "latency='1.5x'.")
        return 1.0 / speedup
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"latency={value!r} is not a number. What to do: pass e.g. latency=0.5 (keep half the "
                          "dense latency) or latency='2x'.")
    if not 0.0 < value < 1.0:
        raise ConfigError(f"latency={value} is outside (0, 1): it is the fraction of the dense model's measured "
                          "latency to keep. What to do: pass e.g. latency=0.5, or a speed-up as latency='2x'.")
    return float(value)


def check_request(latency: Any, options: Any, example_input: Any) -> Tuple[float, LatencyOptions]:
    """A latency request checked before any work: (fraction of the dense latency to keep, options). The example
    input must carry a tensor to time with (its batch size is the one timed)."""
    fraction = parse_latency(latency)
    if options is not None and not isinstance(options, LatencyOptions):
        raise ConfigError(f"latency_options={options!r}. What to do: pass obafx.LatencyOptions(...) or None.")
    if not _has_tensor(example_input):
        raise ConfigError("latency= times the model on the example input, but the example input holds no tensor "
                          f"(got {type(example_input).__name__}), so there is nothing to time with. What to do: pass "
                          "a real example batch (its batch size is the one timed).")
    return fraction, options or LatencyOptions()


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    return False


class LatencyBudget:
    """One compile_prune call's latency budget: the dense module, the options, and every measurement made.

    ``dense``: the module the user passed (only private copies of it are timed), the reference every cost is a
    fraction of. ``estimator(current, facts, coupling)`` gives a step's ``estimate(removed) -> cost``;
    ``measure(gm) -> cost`` times a candidate against the dense module; ``accept(gm)`` records which candidate the
    step kept."""

    def __init__(self, fraction: float, options: LatencyOptions, dense, inputs: Tuple[Any, ...]):
        self.fraction = fraction
        self.options = options
        self.dense = dense
        self.inputs = tuple(inputs)
        self.measured: Dict[int, Dict[str, Any]] = {}  # id(module) -> its alternating measurement
        self.current: Dict[str, Any] = {"ratio": 1.0}  # the measurement of the module the next step starts from
        self.cache_hits = self.cache_misses = 0
        self.blocks: Dict[str, int] = {}  # layer signature -> the largest kernel block of its dims (1: none)
        self._dense_placed = None  # (module, inputs) of the dense module on the timing device, made once
        self._newest: Optional[Tuple[Any, Any]] = None  # (newest candidate, its placed copy: compiled once)

    def target(self, step: int, steps: int) -> float:
        return self.fraction ** (step / steps)

    def estimator(self, current, facts, coupling) -> Tuple[Callable[[Set[int]], float], Dict[str, int]]:
        """The cost model of ``current`` (a Traced), calibrated so that removing nothing costs its measured
        ratio to the dense module: tables from the cache, missing ones measured and cached. Returns
        (``estimate(removed) -> cost``, group id -> the kernel block its kept width should be a multiple of)."""
        opts = self.options
        # Layers are timed eagerly even for mode="compile": compiling every layer at every grid width would take
        # minutes per layer, inductor calls the same convolution / GEMM kernels, and the compiled end-to-end
        # measurement below and in measure() corrects the rest.
        layer_opts = replace(opts, mode="eager")
        specs = layer_specs(current.gm, facts.shapes, coupling)
        parts = layer_opts.key_parts(self.inputs)
        cached = load_tables(opts.cache, parts)
        hits, missing = split_cached(tuple(s.signature() for s in specs), cached)
        self.cache_hits, self.cache_misses = self.cache_hits + len(hits), self.cache_misses + len(missing)
        todo = set(missing)
        fresh = measure_tables([s for s in specs if s.signature() in todo], layer_opts, self.inputs)
        if fresh:
            store_tables(opts.cache, parts, fresh)
        with threads(opts.threads):
            total = median_call(*self._placed(current.gm), opts)
        tables = {**cached, **fresh}
        layers = sum(tables[s.signature()].at(s.in_width, s.out_width) for s in specs)
        elements = element_weights(current.gm, facts.shapes, coupling, {s.name for s in specs})
        model = LatencyModel(coupling, specs, tables, rest_seconds=total - layers, elements=elements)
        scale = self.current["ratio"] / max(model.estimate(set()), 1e-12)
        for spec in specs:
            table = tables[spec.signature()]
            self.blocks[spec.signature()] = max(table.in_block, table.out_block)
        return (lambda removed: model.estimate(removed) * scale), model.group_blocks(coupling.unit_group())

    def _placed(self, gm):
        """``gm`` on the timing device and dtype (compiled in "compile" mode); the dense module's is made once."""
        if gm is not self.dense:
            return placed(gm, self.inputs, self.options)
        if self._dense_placed is None:
            self._dense_placed = placed(self.dense, self.inputs, self.options)
        return self._dense_placed

    def measure(self, gm) -> float:
        """``gm``'s latency as a fraction of the dense module's, timed in alternation with it."""
        # only the newest candidate's placed copy is kept (a confirm follows its measurement; a copy that is gone
        # is placed again): eight copies of a large model would hold memory the user's device may not have
        self._newest = (gm, placed(gm, self.inputs, self.options))
        return self._alternate(gm, None)

    def confirm(self, gm) -> float:
        """``gm``'s latency measured again and pooled with its first measurement (twice the rounds). The loop
        asks before it accepts a candidate that landed within the tolerance: among several noisy candidates, the
        one whose single measurement landed in the band is biased toward the band (a lucky draw), and a second,
        pooled look takes most of that luck out. It asks for a near miss too (within twice the tolerance): one
        draw pushes a candidate out of the band as easily as in."""
        return self._alternate(gm, self.measured.get(id(gm)))

    def _alternate(self, gm, earlier: Optional[Dict[str, Any]]) -> float:
        result = alternate(self.dense, gm, self.inputs, self.options, desc="obafx latency: dense vs candidate",
                           dense_placed=self._placed(self.dense),
                           candidate_placed=self._newest[1] if self._newest and self._newest[0] is gm else None,
                           earlier=earlier)
        self.measured[id(gm)] = result
        return result["ratio"]

    def accept(self, gm, target: float) -> Optional[str]:
        """The step kept ``gm``: the next step starts from its measurement. Returns a note when ``gm`` is slower
        than ``target`` beyond the tolerance (what bounds the speed-up, and what may lower it)."""
        self.current = self.measured.get(id(gm), self.current)
        self.measured, self._newest = {}, None  # the other candidates are gone: their ids may be reused
        if self.current["ratio"] <= target * (1 + self.options.tolerance):
            return None
        return (f"latency: the fastest candidate runs {1 / self.current['ratio']:.2f}x faster than the dense "
                f"model, short of {1 / target:.2f}x: time that does not shrink with channels (per-op overhead, "
                "layers that are not pruned) bounds the speed-up at this batch size; a larger batch or "
                "mode='compile' leaves less of it")

    def report(self) -> Dict[str, Any]:
        """What the report records: the request, the final measurement and its protocol, the cache use."""
        final = {k: v for k, v in self.current.items()}
        return {"requested_fraction": self.fraction, "requested_speedup": 1.0 / self.fraction,
                "measured": final if "dense_s" in final else None, "tolerance": self.options.tolerance,
                "cache": self.options.cache or None, "layer_tables_cached": self.cache_hits,
                "layer_tables_measured": self.cache_misses,
                "kernel_blocks": {str(b): n for b, n in sorted(Counter(self.blocks.values()).items())}}

