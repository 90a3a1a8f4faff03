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


def latency(d: Dict) -> str:
    """Requested vs measured speed-up per cell, with the verdict and, for a miss, the reason."""
    rows = [(c["model"], c["batch"], c["mode"], f"{c['requested_speedup']:g}x",
             f"{c['speedup']:.2f}x" if c.get("speedup") else "-",
             f"{c['mac_ratio']:.1f}x" if c.get("mac_ratio") else "-",
             c["status"] + (f": {_first_clause(c['why'])}" if c.get("why") else "")) for c in d["cells"]]
    reduced = f" **{d['reduced']}**." if d.get("reduced") else ""
    return ("### Latency budgets (`python3 benchmarks/latency.py`)\n\n"
            f"{d['met']} of {d['total']} cells within {d['protocol']['within']:.0%} of the requested speed-up "
            f"(re-measured, dense and pruned in alternation, {d['protocol']['timer']}).{reduced}\n\n"
            + table(["model", "batch", "mode", "asked", "measured", "MAC ratio", "verdict"], rows))


def _first_clause(text: str, limit: int = 110) -> str:
    """The reason up to its first ';' (the JSON keeps the whole of it), at most ``limit`` characters."""
    text = text.split(";")[0].strip()
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def train_speed(d: Dict) -> str:
    rows = [(r["model"], r["format"], r["batch"], f"{r['mac_ratio']:.2f}", f"{r['train_speedup']:.2f}",
             f"{r['infer_speedup']:.2f}") for r in d["rows"]]
    reduced = f" {d['reduced']}." if d.get("reduced") else ""
    return ("### Training step of the pruned model (`python3 benchmarks/train_speed.py`)\n\n"
            f"One SGD step, dense and pruned in alternation, medians.{reduced}\n\n"
            + table(["model", "memory format", "batch", "MAC ratio", "train-step speed-up", "inference speed-up"],
                    rows))


def hvp_cost_group(d: Dict) -> str:
    """The group-exact score's cost beside OBA's of the same mode (CPU time and peak memory)."""
    rows = []
    for m, r in d["models"].items():
        ops = r["ops"]
        for mode in ("full", "residual"):
            g, o = ops.get(f"group_{mode}"), ops.get(mode)
            if g and o:
                rows.append((m, mode, f"{g['cpu_s'] / o['cpu_s']:.2f}x", f"{g['peak_mem_mib'] / o['peak_mem_mib']:.2f}x"))
    return ("### Cost of the group-exact score (`oba_group`) against OBA's (`python3 benchmarks/hvp_cost.py --models "
            "resnet56 --batch 32 --reps 3 --threads 1 --out benchmarks/results/hvp_cost_group.json`)\n\n"
            f"Batch {d['settings']['batch']}, median of {d['settings']['reps']}, CPU time (the machine was loaded).\n\n"
            + table(["model", "mode", "CPU time / OBA", "peak memory / OBA"], rows))
