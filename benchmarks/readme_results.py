"""Render the results from benchmarks/results/*.json (never typed by hand).

    python3 benchmarks/readme_results.py    # README.md between the results markers: one headline per benchmark;
                                            # benchmarks/RESULTS.md: every full table
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import readme_headlines as head  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _load(name):
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def hvp_cost(d):
    rows = [(m, f"{r['ratios']['full_time']:.2f}x", f"{r['ratios']['residual_time']:.2f}x",
             f"{r['ratios']['full_mem']:.2f}x", f"{r['ratios']['residual_mem']:.2f}x") for m, r in d["models"].items()]
    return ("### Cost of one OBA scoring batch, relative to one gradient (`python3 benchmarks/hvp_cost.py`)\n\n"
            f"Batch {d['settings']['batch']}, 32x32, median of {d['settings']['reps']} reps, each measurement in its own "
            f"process, {d['machine']['device']} ({d['machine']['cpu_count']} cores). Targets: full <= 4x, residual <= 7x, "
            "memory <= 4x.\n\n" + _table(["model", "full time", "residual time", "full peak mem", "residual peak mem"], rows))


def throughput(d):
    rows = []
    for r in d["rows"]:
        if r.get("error"):
            continue
        rows.append((r["model"], r["budget_label"], r["mode"], f"{r['mac_ratio_thop']:.2f}",
                     f"{r['mac_ratio_flopcounter']:.2f}", f"{r['speedup_latency']:.2f}", f"{r['speedup_throughput']:.2f}"))
    return ("### Is the speed-up real? (`python3 benchmarks/throughput.py`)\n\n"
            f"CPU ({d['rows'][0]['device']}), 1 thread, dense and pruned timed in alternation, medians. MAC ratio = "
            "dense/pruned MACs (thop; FlopCounterMode also sees attention matmuls). Speed-up = dense time / pruned time "
            "at batch 1 (latency) and at the throughput batch.\n\n"
            + _table(["model", "budget", "mode", "MAC ratio thop", "MAC ratio FlopCounter", "speed-up b=1",
                      "speed-up batch"], rows) + "\n\n![throughput](benchmarks/results/throughput.png)")


def fuzz(d):
    return ("### Fuzzing the compiler (`python3 benchmarks/fuzz.py --examples 2000`)\n\n"
            f"{d['tried']} random architectures: {d['verified']} pruned and verified by the oracles, {d['refused']} refused "
            f"with a clear obafx error ({d.get('refused_by_type')}), **{d['failed']} failed** ({d.get('failed_by_kind')}; "
            "the causes are fixed or listed as open in the notes).")


def zoo(d):
    models, s = d["models"], d.get("summary", {})
    ob, tp = s.get("obafx", {}), s.get("torch_pruning", {})
    n = len(models)
    head = (f"### Every torchvision classification model (`python3 benchmarks/zoo.py --timeout "
            f"{d['settings']['timeout_s']:g}`)\n\n"
            f"{n} models, each pruned to half its MACs at a small input (weights=None, randomised), each result checked. "
            f"**obafx: {ob.get('pass', 0)} pass**, {ob.get('fail', 0)} fail, {ob.get('error', 0)} error "
            f"({ob.get('inexact_norm', 0)} of the passes normalise over a pruned dim, so the masking oracle is checked "
            f"exactly on the norm-free groups). Torch-Pruning MetaPruner on the same models: {tp.get('pass', 0)} pass, "
            f"{tp.get('fail', 0)} fail, {tp.get('error', 0)} error; the masking oracle confirms "
            f"{tp.get('masked_agree', 0)} of its results and finds {tp.get('masked_inconsistent', 0)} where it removed "
            "a channel from some tensors that carry it and kept it in others.")
    for rerun in d["settings"].get("reruns", []):
        head += (f" Rerun into the same file: `python3 benchmarks/zoo.py --models {','.join(rerun['models'])} "
                 f"--timeout {rerun['timeout_s']:g} --mem-gb {rerun['mem_gb']:g} --update`.")
    limit = d["settings"].get("mem_gb", 0)
    if limit:
        head += (f" Each (model, tool) ran in its own process under a {limit:g} GB address-space limit unless a rerun "
                 "says otherwise; a MemoryError below is that limit.")
    rows = [(name, _zoo_cell(m.get("obafx", {})), _zoo_cell(m.get("torch_pruning", {})))
            for name, m in sorted(models.items())]
    bad = [r for r in rows if not (r[1].startswith("pass") and r[2].startswith("pass"))]
    out = head
    if bad:
        out += "\n\nModels where either tool did not pass:\n\n" + _table(["model", "obafx", "Torch-Pruning"], bad)
    return out + ("\n\n<details><summary>All models</summary>\n\n" + _table(["model", "obafx", "Torch-Pruning"], rows)
                  + "\n\n</details>")


def _zoo_cell(e: dict) -> str:
    status = e.get("status", "-")
    if status == "pass":
        extra = f" (MACs {e['macs_ratio']:.3f})" if isinstance(e.get("macs_ratio"), float) else ""
        return "pass" + extra
    return f"{status}: {e.get('why', '')[:120]}".replace("|", "/")


def analysis_speed(d):
    rows = []
    for name, m in d["models"].items():
        stages = m["obafx"].get("stages_median_s", {})
        rows.append((name.partition("@")[0], "x".join(str(v) for v in m["input"][2:]), f"{m['obafx']['median_s'] * 1e3:.0f}",
                     " / ".join(f"{stages[k] * 1e3:.0f}" for k in ("trace", "analyze", "couple") if k in stages),
                     _ms(m.get("fx_trace_alone_median_s")), f"{m['torch_pruning']['median_s'] * 1e3:.0f}",
                     f"{m['ratio_obafx_over_tp']:.2f}", f"{m['cpu_ratio_obafx_over_tp']:.2f}",
                     "yes" if m["meets_target"] else "no"))
    return ("### Analysis time against Torch-Pruning's DependencyGraph (`python3 benchmarks/analysis_speed.py`)\n\n"
            f"Both tools on the same model and input in one process, alternating, median of {d['settings']['reps']} "
            f"runs, {d['settings'].get('threads', 1)} thread. obafx's time includes its private copy of the model (the "
            "user's model is never touched) and a meta-tensor run that records every node's shape; \"fx trace alone\" "
            "is torch.fx's symbolic trace of the model by itself, the floor under any fx-based analysis. ResNet-50 and "
            "DenseNet-121 are measured twice: at 64x64, where Torch-Pruning's real forward pass is cheapest (the strict "
            "comparison), and at their native 224x224. obafx's analysis runs on meta tensors, so its time does not "
            "depend on the input size; Torch-Pruning's grows with it. The target is judged on the wall-clock ratio; "
            "the CPU-time ratio is steadier on a shared machine. Rows ran at different moments on a shared machine: "
            "compare the ratios, not milliseconds across rows." + _run_notes(d["settings"]) + "\n\n"
            + _table(["model", "input", "obafx ms", "trace / analyze / couple ms", "fx trace alone ms",
                      "Torch-Pruning ms", "obafx / TP", "CPU-time ratio", "target (<= 1) met"], rows))


def _run_notes(settings) -> str:
    """The run's own note and the default models it left out, as sentences ('' when neither)."""
    left = settings.get("models_left_out") or []
    note = f" Run note: {settings['note']}" if settings.get("note") else ""
    return note + (f" Not in this run: {', '.join(left)}." if left else "")


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f}"


HEADLINES = (("accuracy", head.accuracy), ("throughput", head.throughput), ("latency", head.latency), ("train_speed", head.train_speed),
             ("hvp_cost", head.hvp_cost), ("hvp_cost_group", head.hvp_cost_group), ("score_truth", head.score_truth),
             ("joint_removal", head.joint_removal), ("random_at_widths", head.random_at_widths),
             ("hf_scale", head.hf_scale), ("zoo", head.zoo), ("analysis_speed", head.analysis_speed), ("fuzz", head.fuzz))
FULL = (("accuracy", head.accuracy_full), ("fixed_widths", head.fixed_widths), ("width_swap", head.width_swap),
        ("throughput", throughput), ("latency", head.latency_full),
        ("train_speed", head.train_speed_full), ("hvp_cost", hvp_cost), ("hvp_cost_group", head.hvp_cost_group),
        ("score_truth", head.score_truth), ("joint_removal", head.joint_removal),
        ("random_at_widths", head.random_at_widths), ("hf_scale", head.hf_scale),
        ("zoo", zoo), ("analysis_speed", analysis_speed),
        ("fuzz", fuzz))


def render_full() -> str:
    """benchmarks/RESULTS.md: every benchmark's full table, in README order."""
    parts = [_load(name) and fn(_load(name)) for name, fn in FULL]
    return ("# obafx benchmark results (generated by `python3 benchmarks/readme_results.py`; do not edit)\n\n"
            + "\n\n".join(p for p in parts if p) + "\n")


def render() -> str:
    """The README's results block: one short headline per benchmark, linking the full tables."""
    parts = []
    for name, fn in HEADLINES:
        d = _load(name)
        if d is not None:
            parts.append(fn(d))
    return "Full tables: [benchmarks/RESULTS.md](benchmarks/RESULTS.md).\n\n" + "\n\n".join(parts)


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = f"{START}\n{render()}\n{END}"
    if START in text:
        text = text[:text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text += "\n## Results\n\n" + block + "\n"
    readme.write_text(text)
    (ROOT / "benchmarks" / "RESULTS.md").write_text(render_full())
    return 0


if __name__ == "__main__":
    sys.exit(main())
