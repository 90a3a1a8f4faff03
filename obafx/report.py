"""The report attached to every pruned module: sizes before/after, groups, barriers, the plan."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import torch.fx as fx

from obafx.passes.errors import ConfigError

_META_KEY = "obafx_report"


@dataclass(frozen=True)
class Report:
    """What compile_prune did. ``plan`` maps every changed parameter/buffer (original qualified name) to
    {dim: kept indices}; ``groups`` lists each coupled group with its width before and after."""

    params_before: int
    params_after: int
    macs_before: float
    macs_after: float
    importance: str
    steps: int
    groups: List[Dict[str, Any]]
    barriers: List[Dict[str, str]]
    plan: Dict[str, Dict[str, List[int]]]
    masked_error: Optional[float] = None
    notes: List[str] = field(default_factory=list)
    seconds: Dict[str, float] = field(default_factory=dict)
    sparsity: Dict[str, float] = field(default_factory=dict)  # unstructured mode: zeroed fraction per weight
    overall_sparsity: Optional[float] = None  # unstructured mode: zeroed fraction of all scored weights
    inputs: List[Dict[str, Any]] = field(default_factory=list)  # example-input spec, for obafx.load
    latency: Dict[str, Any] = field(default_factory=dict)  # latency= budget: request, measured times, protocol
    scored_with: str = ""  # the data, loss and targets the importance scores came from, in words
    counter: str = "thop"  # what counted the MACs: "thop" or "flops" (torch's FlopCounterMode)
    capture: str = "fx"  # how the model was captured: "fx" (symbolic trace) or "export" (torch.export)


    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["macs_ratio"] = self.macs_ratio
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def summary(self) -> str:
        """A short before/after table."""
        rows = [("", "before", "after", "ratio"),
                ("params", f"{self.params_before:,}", f"{self.params_after:,}", f"{self.params_after / max(self.params_before, 1):.3f}"),
                (f"MACs ({self.counter})", f"{self.macs_before:,.0f}", f"{self.macs_after:,.0f}", f"{self.macs_ratio:.3f}")]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
        lines.append(f"groups pruned: {sum(1 for g in self.groups if g['width_after'] < g['width_before'])}"
                     f"/{len(self.groups)}, barriers: {len(self.barriers)}, importance: {self.importance}, steps: {self.steps}")
        if self.sparsity:
            lines.append(f"unstructured sparsity over prunable weights: {self.overall_sparsity:.3f}")
        if self.latency:
            lines.append(_latency_line(self.latency))
        if self.scored_with:
            lines.append(f"scored with: {self.scored_with}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _latency_line(latency: Dict[str, Any]) -> str:
    """A latency budget's request and final measurement, with how it was measured."""
    m = latency.get("measured")
    if not m:
        return f"latency: asked for {latency['requested_speedup']:.2f}x (nothing measured)"
    return (f"latency: asked for {latency['requested_speedup']:.2f}x, measured {m['speedup']:.2f}x (dense "
            f"{m['dense_s'] * 1e3:.3g} ms, pruned {m['pruned_s'] * 1e3:.3g} ms; {m['device']}, {m['mode']}, "
            f"{m['dtype']}, batch {m['batch']}, {m['threads']} threads, median of {m['rounds']} alternating rounds x "
            f"{m['reps']} calls)")


def input_spec(inputs) -> List[Dict[str, Any]]:
    """Shape and dtype of each positional example input (constants by value), JSON-ready."""
    import torch

    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor):
            out.append({"kind": "tensor", "shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")})
        elif x is None or isinstance(x, (bool, int, float, str)):
            out.append({"kind": "constant", "value": x})
        else:
            out.append({"kind": "opaque", "type": type(x).__name__})
    return out


def attach(gm: fx.GraphModule, rep: Report) -> None:
    gm.meta[_META_KEY] = rep


def report(pruned: fx.GraphModule) -> Report:
    """The report of a module returned by compile_prune (or obafx.load)."""
    rep = getattr(pruned, "meta", {}).get(_META_KEY) if isinstance(pruned, fx.GraphModule) else None
    if rep is None:
        raise ConfigError("this module carries no obafx report. What to do: pass the module returned by "
                          "obafx.compile_prune (or obafx.load).")
    return rep
