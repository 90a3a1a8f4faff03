"""Render the README's results section from benchmarks/results/*.json (never typed by hand).

    python3 benchmarks/readme_results.py          # rewrites README.md between the results markers
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

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


def accuracy(d):
    rows = [(s["model"], s["method"], f"{s['factor']:g}x", s["seeds"], f"{s['macs_ratio']:.3f}",
             f"{s['acc_pruned']:.4f} ± {s['acc_pruned_std']:.4f}", f"{s['acc_finetuned']:.4f} ± {s['acc_finetuned_std']:.4f}",
             f"{s['prune_seconds']:.0f}") for s in d["summary"]]
    dense = {r["model"]: r["acc_dense"] for r in d["rows"] if r.get("method") == "dense"}
    return (f"### Accuracy after pruning on Fashion-MNIST (`{d['command']}`)\n\n"
            f"Dense test accuracy: {dense}. 'pruned' = after BatchNorm recalibration, 'fine-tuned' = after the same "
            f"{d['config']['finetune_steps']} fine-tuning steps for every method; mean ± std over seeds.\n\n"
            + _table(["model", "method", "MACs /", "seeds", "MACs kept", "acc pruned", "acc fine-tuned", "prune s"], rows))


def zoo(d):
    s = d.get("summary", {})
    return ("### torchvision model zoo (`python3 benchmarks/zoo.py`)\n\n```\n" + json.dumps(s, indent=1)[:3000] + "\n```")


def analysis_speed(d):
    return ("### Analysis speed vs Torch-Pruning (`python3 benchmarks/analysis_speed.py`)\n\n```\n"
            + json.dumps(d.get("summary", d.get("models", {})), indent=1)[:2000] + "\n```")


def render() -> str:
    parts = []
    for name, fn in (("accuracy", accuracy), ("throughput", throughput), ("hvp_cost", hvp_cost), ("zoo", zoo),
                     ("analysis_speed", analysis_speed), ("fuzz", fuzz)):
        d = _load(name)
        if d is not None:
            parts.append(fn(d))
    return "\n\n".join(parts)


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = f"{START}\n{render()}\n{END}"
    if START in text:
        text = text[:text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text += "\n## Results\n\n" + block + "\n"
    readme.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
