"""Model-zoo benchmark: every torchvision classification model pruned to half its MACs by obafx and by
Torch-Pruning, each result verified. Per model: weights=None, eval, every parameter and buffer randomised (norms
are not identities, values distinct); input 64x64, else 128 or 224, the first size the model runs on; float64,
except float32 for models over 150M parameters or needing 224x224 (exactness tolerance 1e-9, float32: 1e-4).

- obafx: ``compile_prune(m, x, macs=0.5)``; checks: output shape, the masking oracle (exact where no LayerNorm /
  GroupNorm normalises over a pruned dim; where one does the model is "inexact-norm" and the oracle is checked
  exactly on a removal that avoids norm-coupled groups), MACs ratio within 2% of 0.5 (thop, as in the report),
  re-trace, ``torch.jit.trace``, keep-all identity (bit-identical).
- Torch-Pruning: one-shot ``MetaPruner`` (magnitude p=2, not global, final classifier ignored), its channel ratio
  searched until its own MAC count is at most half; checks: runs, output shape, MACs ratio, and the masking oracle
  on the channels it removed (decoded from the pruned tensors, mapped onto obafx's coupled units).

Each (model, tool) runs in its own subprocess with ``--timeout``: a hang or a crash costs one entry only.
Usage: python3 benchmarks/zoo.py [--models a,b] [--quick] [--timeout 240] [--jobs 1] [--out PATH]
Writes JSON (default benchmarks/results/zoo.json), rewritten after every model.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torchvision

import obafx
from obafx.passes.rewrite import rewrite
from obafx.passes.trace import trace
from obafx.passes.verify import masked_output

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import error_entry, machine_info, run_isolated, write_json  # noqa: E402
from zoo_common import (_NORM_FUNCS, MAC_TOL, TARGET, analyse, build, exact_tol, macs_ok,  # noqa: E402,F401
                        norm_owners, rel_err)
from zoo_tp import run_tp  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "zoo.json")
QUICK_MODELS = ("resnet18", "mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x0_5")
TOOLS = ("obafx", "torch_pruning")


def _norm_sig(m: torch.nn.Module) -> Tuple[Any, ...]:
    w = getattr(m, "weight", None)
    return getattr(m, "normalized_shape", None), getattr(m, "num_channels", None), getattr(w, "shape", None)


def norm_changed(traced_gm: torch.fx.GraphModule, pruned: torch.fx.GraphModule) -> List[str]:
    """Norms whose normalised size changed: module attributes/weights, or functional normalized_shape args."""
    mods = dict(pruned.named_modules())
    changed = [name for name, m in traced_gm.named_modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm))
               and name in mods and _norm_sig(m) != _norm_sig(mods[name])]
    after = {n.name: n for n in pruned.graph.nodes}
    return changed + [n.name for n in traced_gm.graph.nodes if n.op == "call_function" and n.name in after
                      and getattr(n.target, "__name__", "") in _NORM_FUNCS and n.args[1:2] != after[n.name].args[1:2]]


def subset_check(traced, facts, coupling, x: torch.Tensor) -> Dict[str, Any]:
    """The exact masking oracle on a removal (about 1/3 of each group) that avoids every norm-coupled group."""
    owners = norm_owners(traced.gm)
    rng = np.random.default_rng(0)
    removed, used = set(), 0
    for g in coupling.groups:
        if g.width < 2 or any(coupling.slot_roles[k][1] in owners or k[0].rpartition(".")[0] in owners
                              for k in g.members):
            continue
        removed.update(rng.choice(g.units, max(1, g.width // 3), replace=False).tolist())
        used += 1
    if not removed:
        return {"groups": 0, "error": None, "ok": None}
    pruned = rewrite(traced, coupling, facts.shapes, removed)
    with torch.no_grad():
        err = rel_err(masked_output(traced, coupling, removed), pruned(x))
    return {"groups": used, "of_groups": len(coupling.groups), "error": err, "ok": err < exact_tol(x)}


def run_obafx(model: torch.nn.Module, x: torch.Tensor) -> Dict[str, Any]:
    """compile_prune to half the MACs and every check; returns the entry (status, why, numbers, times)."""
    r: Dict[str, Any] = {"times_s": {}}
    t0 = time.perf_counter()
    pruned = obafx.compile_prune(model, x, macs=TARGET)
    r["times_s"]["prune"] = time.perf_counter() - t0
    rep = obafx.report(pruned)
    with torch.no_grad():
        y0, y1 = model(x), pruned(x)
    r.update(macs_ratio=rep.macs_ratio, params_ratio=rep.params_after / rep.params_before,
             masked_error=rep.masked_error, barriers=len(rep.barriers), groups=len(rep.groups),
             stage_s=rep.seconds, shape_ok=tuple(y0.shape) == tuple(y1.shape))
    t1 = time.perf_counter()
    traced, facts, coupling = analyse(model, x)
    with torch.no_grad():
        r["keep_all_identical"] = bool(torch.equal(rewrite(traced, coupling, facts.shapes, set())(x), y0))
    r["inexact_norm"] = norm_changed(traced.gm, pruned)
    r["oracle"] = "exact" if r["masked_error"] < exact_tol(x) else ("inexact-norm" if r["inexact_norm"] else "broken")
    if r["oracle"] == "inexact-norm":
        r["subset"] = subset_check(traced, facts, coupling, x)
    with torch.no_grad():
        r["retrace_ok"] = rel_err(y1, trace(pruned, x).gm(x)) == 0.0
        r["jit_error"] = rel_err(y1, torch.jit.trace(pruned, x, check_trace=False)(x))
    # jit.trace itself is not bit-exact on some models (swin_t float64: 2.6e-8 before any pruning)
    r["jit_ok"] = r["jit_error"] < (1e-6 if x.dtype == torch.float64 else 1e-3)
    r["times_s"]["checks"] = time.perf_counter() - t1
    return _verdict(r)


def _verdict(r: Dict[str, Any]) -> Dict[str, Any]:
    why = []
    if not r["shape_ok"]:
        why.append("output shape changed")
    if r["oracle"] == "broken":
        why.append(f"masking oracle error {r['masked_error']:.2e} with no norm over a pruned dim")
    if r["oracle"] == "inexact-norm" and r["subset"]["ok"] is False:
        why.append(f"masking oracle on norm-free groups: error {r['subset']['error']:.2e}")
    if not macs_ok(r["macs_ratio"]):
        why.append(f"MACs ratio {r['macs_ratio']:.4f} not within {MAC_TOL:.0%} of {TARGET}")
    why += [what for key, what in (("keep_all_identical", "keep-all not bit-identical"),
                                   ("retrace_ok", "re-trace differs"), ("jit_ok", "jit.trace differs")) if not r[key]]
    r["status"], r["why"] = ("fail", "; ".join(why)) if why else ("pass", "")
    return r


def worker(name: str, tool: str, quick: bool) -> Dict[str, Any]:
    """One (model, tool) in this process; exceptions become an 'error' entry with their origin."""
    t0 = time.perf_counter()
    entry: Dict[str, Any] = {}
    try:
        model, x, dtype = build(name, (32, 64, 224) if quick else (64, 128, 224))
        entry.update(input=list(x.shape), dtype=dtype)
        entry.update(run_obafx(model, x) if tool == "obafx" else run_tp(model, x))
    except Exception as exc:  # every failure is a result to record, not a crash
        entry.update(error_entry(exc))
    entry["wall_s"] = time.perf_counter() - t0
    return entry


def summarise(models: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Counts per tool: pass/fail/error, obafx's inexact-norm models, TP results the masking oracle confirms and
    TP results with inconsistent removals (see tp_masked)."""
    rows = {tool: [m[tool] for m in models.values() if tool in m] for tool in TOOLS}
    out = {tool: {s: sum(1 for e in rows[tool] if e.get("status") == s) for s in ("pass", "fail", "error")}
           for tool in TOOLS}
    out["obafx"]["inexact_norm"] = sum(1 for e in rows["obafx"] if e.get("oracle") == "inexact-norm")
    masked = [e.get("masked", {}) for e in rows["torch_pruning"]]
    out["torch_pruning"]["masked_agree"] = sum(1 for e in masked if e.get("ok"))
    out["torch_pruning"]["masked_inconsistent"] = sum(1 for e in masked if e.get("inconsistent"))
    return out


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=None, help="comma-separated torchvision model names (default: all)")
    p.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK_MODELS)} at 32x32 (smoke test)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per model and tool")
    p.add_argument("--jobs", type=int, default=1, help="subprocesses at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per subprocess")
    p.add_argument("--mem-gb", type=float, default=12.0, help="address-space limit per subprocess (0: none)")
    p.add_argument("--tools", default=",".join(TOOLS), help="obafx,torch_pruning (default both)")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON output path")
    p.add_argument("--update", action="store_true",
                   help="rerun --models into the existing --out: their entries are replaced, the rest kept, and the "
                        "rerun's settings are recorded under settings.reruns")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tool", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def model_names(args: argparse.Namespace) -> List[str]:
    if args.models:
        return [m for m in args.models.split(",") if m]
    return list(QUICK_MODELS) if args.quick else torchvision.models.list_models(module=torchvision.models)


def _start_report(args: argparse.Namespace, settings: Dict[str, Any]) -> Dict[str, Any]:
    """A fresh report, or with --update the existing one with this rerun's models and settings noted."""
    if not args.update or not os.path.exists(args.out):
        return {"machine": machine_info(), "models": {}, "summary": {}, "settings": settings}
    with open(args.out) as f:
        report = json.load(f)
    report["settings"].setdefault("reruns", []).append({**settings, "models": model_names(args)})
    return report


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the benchmark (or, with --worker, one model and tool); returns the report written to --out."""
    args = parse_args(argv)
    if args.worker:
        torch.set_num_threads(args.threads)
        if args.mem_gb > 0:  # a model too big for the machine fails alone instead of waking the OOM killer
            resource.setrlimit(resource.RLIMIT_AS, (int(args.mem_gb * 2**30),) * 2)
        entry = worker(args.worker, args.tool, args.quick)
        write_json(args.result, entry)
        return entry
    tools = [t for t in args.tools.split(",") if t]
    settings = {"quick": args.quick, "timeout_s": args.timeout, "target_macs": TARGET, "mac_tolerance": MAC_TOL,
                "tools": tools, "jobs": args.jobs, "threads": args.threads, "mem_gb": args.mem_gb}
    report = _start_report(args, settings)
    jobs = [(n, t) for n in model_names(args) for t in tools]
    base = [sys.executable, os.path.abspath(__file__), "--threads", str(args.threads), "--mem-gb", str(args.mem_gb)]
    base += ["--quick"] if args.quick else []
    run = lambda job: run_isolated(base + ["--worker", job[0], "--tool", job[1]], args.timeout)  # noqa: E731
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for (name, tool), entry in zip(jobs, pool.map(run, jobs)):
            report["models"].setdefault(name, {})[tool] = entry
            report["summary"] = summarise(report["models"])
            write_json(args.out, report)  # partial results survive an interrupted run
            print(f"{name:22s} {tool:14s} {entry.get('status'):6s} {entry.get('wall_s', 0):7.1f}s "
                  f"macs {entry.get('macs_ratio', float('nan')):.3f} {entry.get('why', '')[:150]}", flush=True)
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
