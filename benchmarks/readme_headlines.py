"""The README's short result headlines, one per benchmark (the full tables go to benchmarks/RESULTS.md).

Each function takes a benchmark's JSON (as written by its script) and returns a Markdown section: the command,
one small table or sentence, and the plot where there is one.
"""
from __future__ import annotations

from typing import Dict, List, Sequence


def table(header: Sequence[str], rows: List[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def throughput(d: Dict) -> str:
    """Eager rows only, one per (model, budget) without round_to: what a user gets by default."""
    rows = [(r["model"], r["budget_label"], f"{r['mac_ratio_thop']:.2f}", f"{r['mac_ratio_flopcounter']:.2f}",
             f"{r['speedup_latency']:.2f}", f"{r['speedup_throughput']:.2f}")
            for r in d["rows"] if not r.get("error") and r["mode"] == "eager" and "-r" not in r["budget_label"]]
    return ("### Speed-up of the pruned model (`python3 benchmarks/throughput.py`)\n\n"
            f"CPU, 1 thread, dense and pruned timed in alternation, medians; eager rows (compiled rows in RESULTS.md).\n\n"
            + table(["model", "budget", "MAC ratio (thop)", "FLOP ratio (FlopCounter)", "speed-up b=1",
                     "speed-up batch"], rows) + "\n\n![throughput](benchmarks/results/throughput.png)")


def hvp_cost(d: Dict) -> str:
    rows = [(m, f"{r['ratios']['full_time']:.2f}x", f"{r['ratios']['residual_time']:.2f}x")
            + ((f"{r['ratios']['group_time']:.2f}x",) if "group_time" in r["ratios"] else ("-",))
            for m, r in d["models"].items()]
    return ("### Cost of one OBA scoring batch (`python3 benchmarks/hvp_cost.py`)\n\n"
            f"Time relative to one gradient, batch {d['settings']['batch']}, median of {d['settings']['reps']}.\n\n"
            + table(["model", "oba full", "oba residual", "oba_group"], rows))


def zoo(d: Dict) -> str:
    s = d.get("summary", {})
    rows = [(tool, c.get("pass", 0), c.get("fail", 0), c.get("error", 0))
            for tool, c in (("obafx", s.get("obafx", {})), ("Torch-Pruning 1.6.1", s.get("torch_pruning", {})))]
    return (f"### Every torchvision classification model (`python3 benchmarks/zoo.py --timeout "
            f"{d['settings']['timeout_s']:g}`)\n\n"
            f"{len(d['models'])} models pruned to half their MACs, each result checked by the masking oracle.\n\n"
            + table(["tool", "pass", "fail", "error"], rows))


def analysis_speed(d: Dict) -> str:
    rows = [(name.partition("@")[0], "x".join(str(v) for v in m["input"][2:]), f"{m['ratio_obafx_over_tp']:.2f}")
            for name, m in d["models"].items()]
    return ("### Analysis time against Torch-Pruning's DependencyGraph (`python3 benchmarks/analysis_speed.py`)\n\n"
            f"obafx time / Torch-Pruning time, same process, alternating, median of {d['settings']['reps']}.\n\n"
            + table(["model", "input", "obafx / TP"], rows))


def fuzz(d: Dict) -> str:
    met = f", {d['budget_met']} met their MAC budget" if "budget_met" in d else ""
    noted = f" ({d['budget_noted']} missed it with a note)" if d.get("budget_noted") else ""
    return ("### Fuzzing the compiler (`python3 benchmarks/fuzz.py --examples 2000`)\n\n"
            f"{d['tried']} random architectures: {d['verified']} pruned and verified{met}{noted}, {d['refused']} refused "
            f"with a clear obafx error, **{d['failed']} failed**.")
