"""The README's short result headlines, one per benchmark (the full tables go to benchmarks/RESULTS.md).

Each function takes a benchmark's JSON (as written by its script) and returns a Markdown section: the command,
one small table or sentence, and the plot where there is one.
"""
from __future__ import annotations

import os
import sys
from typing import Dict, List, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from acc_results import DEFAULT_METHODS as DEFAULT_ROWS  # noqa: E402  (the library's default OBA's method names)
from acc_results import PAPER_METHODS as PAPER_ROWS  # noqa: E402  (importance="oba", the paper's criterion)


def table(header: Sequence[str], rows: List[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def throughput(d: Dict) -> str:
    """Eager rows only, one per (model, budget) without round_to: what a user gets by default."""
    rows = [(r["model"], r["budget_label"], f"{r['mac_ratio_thop']:.2f}", f"{r['mac_ratio_flopcounter']:.2f}",
             f"{r['speedup_latency']:.2f} / {r['speedup_latency_cpu']:.2f}",
             f"{r['speedup_throughput']:.2f} / {r['speedup_throughput_cpu']:.2f}")
            for r in d["rows"] if not r.get("error") and r["mode"] == "eager" and "-r" not in r["budget_label"]]
    reruns = "".join(f" {', '.join(p['models'])} was rerun later on a machine with load average "
                     f"{p['machine'].get('load_avg_1m', 0):.1f}: read its CPU-time column." for p in d.get("partial_reruns", []))
    return ("### Speed-up of the pruned model (`python3 benchmarks/throughput.py`)\n\n"
            "CPU, 1 thread, dense and pruned timed in alternation, medians; eager rows (compiled rows in RESULTS.md); "
            "each speed-up on the wall clock / on process CPU time (steadier on a shared machine). Budget `2x` is "
            "half of thop's MACs; `2x-flops` is half of FlopCounterMode's count (`counter=\"flops\"`, which counts "
            f"attention's matmuls).{reruns}\n\n"
            + table(["model", "budget", "MAC ratio (thop)", "FLOP ratio (FlopCounter)", "speed-up b=1 (wall / CPU)",
                     "speed-up batch (wall / CPU)"], rows) + "\n\n![throughput](benchmarks/results/throughput.png)")


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
    b = d.get("macs_budgets")
    met = (f" Of the verified `macs=` cases, {b['met']} met their budget within ±{b['tolerance']:.0%} and "
           f"{b['missed_with_note']} missed it with a note in the report (tiny widths: one channel group moves the "
           "cost past the band).") if b else ""
    fails = f" ({d['failed_by_kind']}: an open bug, see Known limits)" if d.get("failed") else ""
    return ("### Fuzzing the compiler (`python3 benchmarks/fuzz.py --examples 2000`)\n\n"
            f"{d['tried']} random architectures: {d['verified']} pruned and verified by the oracles, {d['refused']} "
            f"refused with a clear obafx error ({d.get('refused_by_type')}), **{d['failed']} failed**{fails}.{met}")


def latency(d: Dict, runs_listed: bool = False) -> str:
    """Requested vs measured speed-up per cell, with the verdict and, for a miss, the reason. The README says how
    many runs measured the cells; RESULTS.md (``runs_listed``) lists each run's conditions and commit."""
    rows = [(c["model"], c["batch"], c["mode"], f"{c['requested_speedup']:g}x",
             f"{c['speedup']:.2f}x" if c.get("speedup") else "-",
             f"{c['mac_ratio']:.1f}x" if c.get("mac_ratio") else "-",
             c["status"] + (f": {_first_clause(c['why'])}" if c.get("why") else "")
             + (f" (run {c['run']})" if runs_listed and "run" in c else "")) for c in d["cells"]]
    used = sorted({c["run"] for c in d["cells"] if "run" in c})
    runs = (f" Measured in {len(used)} runs, each a one-thread process on the 2-core CPU; what else ran beside each, "
            "and its obafx commit: [RESULTS.md](benchmarks/RESULTS.md)." if used and not runs_listed else "")
    commit = lambda run: f", obafx {run['obafx_commit']}" if run.get("obafx_commit") else ""  # noqa: E731
    listed = "".join(f"\n- run {i} ({d['runs'][i]['source']}{commit(d['runs'][i])}): "
                     f"{d['runs'][i].get('reduced') or 'full run'}" for i in used) if runs_listed else ""
    return ("### Latency budgets (`python3 benchmarks/latency.py`)\n\n"
            f"{d['met']} of {d['total']} cells within {d['protocol']['within']:.0%} of the requested speed-up "
            f"(re-measured, dense and pruned in alternation, {d['protocol']['timer']}).{runs}{listed}\n\n"
            + table(["model", "batch", "mode", "asked", "measured", "MAC ratio", "verdict"], rows))


def latency_full(d: Dict) -> str:
    return latency(d, runs_listed=True)


def _first_clause(text: str, limit: int = 110) -> str:
    """The reason up to its first ';' (the JSON keeps the whole of it), at most ``limit`` characters."""
    text = text.split(";")[0].strip()
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def _train_row(r: Dict) -> tuple:
    """One train_speed row as table cells (rows from before variants existed read as variant "pruned")."""
    two = lambda key: f"{r[key]:.2f}" if key in r else "-"  # noqa: E731
    return (r["model"], r["format"], r.get("variant", "pruned"), two("mac_ratio"), two("padded16_mac_ratio"),
            f"{two('train_speedup_cpu')} ({two('train_speedup')})",
            f"{two('infer_speedup_cpu')} ({two('infer_speedup')})")


TRAIN_HEADER = ["model", "memory format", "variant", "MAC ratio", "MAC ratio, channels padded to 16",
                "train-step speed-up: CPU time (wall)", "inference speed-up: CPU time (wall)"]


def train_speed(d: Dict) -> str:
    """ResNet rows in channels_last (the faster format for every ResNet variant); the rest in RESULTS.md."""
    rows = [_train_row(r) for r in d["rows"] if r["format"] == "channels_last" and r["model"].startswith("resnet")]
    return _train_section(d, rows, "ResNet rows in channels_last; every model and format in RESULTS.md")


def train_speed_full(d: Dict) -> str:
    return _train_section(d, [_train_row(r) for r in d["rows"]], "All rows")


def _variant_text(v: str, budget: float) -> str:
    if v == "ideal":
        return f"ideal (not pruned: the dense architecture with every width x{budget ** 0.5:.2f})"
    if v.startswith("round"):
        n = v[5:].replace("keep", "")
        return f"{v} (round_to={n}" + (f", keep_narrow=True: groups at most {n} wide stay whole)" if v.endswith("keep")
                                       else ")")
    return {"pruned": "pruned (compile_prune defaults)", "uniform": "uniform (uniform=True)"}.get(v, v)


def _train_section(d: Dict, rows: List[Sequence], which: str) -> str:
    s = d.get("settings", {})
    budget, variants = s.get("budget", 0.5), s.get("variants", ["pruned"])
    reduced = f" {d['reduced'][:1].upper()}{d['reduced'][1:]}." if d.get("reduced") else ""
    return ("### Training step of the pruned model (`python3 benchmarks/train_speed.py`)\n\n"
            f"One SGD step at batch {s.get('batch', 128)}, dense and every variant in every memory format in one "
            f"alternation, medians; speed-up = dense / variant in the same format, on this process's CPU time "
            f"(process_time; on a shared machine the wall clock also counts the time other jobs hold the core) and "
            f"the wall clock; pruned with macs={budget}. "
            f"Variants: {', '.join(_variant_text(v, budget) for v in variants)}. {which}.{reduced}\n\n"
            + table(TRAIN_HEADER, rows))


def score_truth(d: Dict) -> str:
    """Per criterion and model: rank agreement of score per MAC with the true single-unit loss change per MAC, and
    the stream-to-rest price ratio next to the truth's."""
    models = list(d["models"])
    crits = list(d["models"][models[0]]["criteria"])
    rows = [("true loss change", *(f"- / {_num(d['models'][m]['truth_stream_to_rest'])}" for m in models))]
    rows += [(c, *(f"{r['spearman_all']:.2f} / {_num(r['stream_to_rest'])}"
                   for r in (d["models"][m]["criteria"][c] for m in models))) for c in crits]
    return (f"### Do the scores predict the loss change? (`{d['command']}`)\n\n"
            f"{d['protocol']}. Cell: Spearman correlation with the truth, per MAC saved, over all units / median "
            "price of a residual-stream unit over the other units' (per MAC; - where a model has no stream).\n\n"
            + table(["criterion", *models], rows))


def joint_removal(d: Dict) -> str:
    """Per model and group: the k cheapest units' joint loss change against the sum of their single changes."""
    def cell(x):
        return (f"{x['k']}: {x['joint']:+.3f} vs {x['sum_of_singles']:+.3f} "
                f"[other images: {x['held_out_joint']:+.3f} vs {x['held_out_sum_of_singles']:+.3f}]")

    rows = [(m, f"{g['kind']} `{g['group']}` ({g['units']} units)",
             f"{g['negative_fraction']:.2f} / {g['held_out_negative_fraction']:.2f}",
             "; ".join(cell(x) for x in g["removals"]))
            for m, r in d["models"].items() for g in r["groups"]]
    return (f"### Do units' loss changes add up? (`{d['command']}`)\n\n"
            f"{d['protocol']}. Cell, per k: the loss change of removing the group's k cheapest units together vs "
            "the sum of removing each alone (their difference is what no per-unit score sees); in brackets the same "
            "units on other images. Below zero: the fraction of single removals that lower the loss, on the images "
            "that chose the units / on the other images.\n\n"
            + table(["model", "group", "singles below zero", "k: joint vs sum of singles"], rows))


def random_at_widths(d: Dict) -> str:
    """Random channels at each source's widths, fine-tuned, beside the source's own rows (means over seeds)."""
    pm = lambda e, k: f"{e[k]:.3f} ± {e[k + '_std']:.3f}" if k in e else "-"  # noqa: E731
    rows = [(e["widths_of"], e["n"], f"{e.get('params', 0):,.0f}", pm(e, "acc_pruned"), pm(e, "acc_finetuned"),
             pm(e, "source_acc_pruned"), pm(e, "source_acc_finetuned")) for e in d["summary"]]
    model = d["rows"][0]["model"] if d["rows"] else "-"
    factor = d["rows"][0]["factor"] if d["rows"] else 0
    return (f"### Allocation or selection? (`{d['command']}`)\n\n"
            f"{model} at {factor:g}x fewer MACs: random channels at the per-layer widths each source row kept, "
            "recalibrated, then the accuracy benchmark's 1-epoch fine-tune, beside the source's own channels.\n\n"
            + table(["widths of", "seeds", "params", "random channels: recalibrated", "random channels: fine-tuned",
                     "own channels: recalibrated", "own channels: fine-tuned"], rows))


def _num(x) -> str:
    return "-" if x is None or x != x else f"{x:.2f}"


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




def _acc(s: Dict, col: str) -> str:
    if col not in s:
        return "-"
    n = s.get(col + "_n", s.get("seeds", 1))
    return f"{s[col]:.3f} ± {s[col + '_std']:.3f} (n={n})" if n > 1 else f"{s[col]:.3f} (n=1)"


def _best_per_family(summary: List[Dict]) -> List[Dict]:
    """Per (model, factor, family) the row with the best recalibrated accuracy; the library's default OBA and the
    paper's criterion are rows of their own, the best of the other OBA variants another."""
    best: Dict[tuple, Dict] = {}
    for s in summary:
        fam = ("OBA: library default (oba_group)" if s["method"] in DEFAULT_ROWS else
               "OBA: paper's criterion (oba)" if s["method"] in PAPER_ROWS else
               "OBA: other variants" if s.get("family") == "OBA" else (s.get("family") or s["method"]))
        k = (s["model"], s["factor"], fam)
        if "acc_pruned" in s and (k not in best or s["acc_pruned"] > best[k]["acc_pruned"]):
            best[k] = dict(s, family=fam)
    return sorted(best.values(), key=lambda s: (s["model"], s["factor"], -s["acc_pruned"]))


def _per_budget(rows: List[Dict], col: str) -> str:
    """One family's means at each budget, "0.842 / 0.607 / 0.371" (std and seed counts are in RESULTS.md)."""
    return " / ".join(f"{s[col]:.3f}" if col in s else "-" for s in rows)


def accuracy(d: Dict) -> str:
    """The headline: per model, the best row of each family at every budget (both columns), the verdict and the
    plots; the protocol's scope note and every row go to RESULTS.md."""
    best = _best_per_family(d["summary"])
    factors = sorted({s["factor"] for s in best})
    by_family: Dict[tuple, Dict[float, Dict]] = {}  # (model, family) -> factor -> its best row
    for s in best:
        by_family.setdefault((s["model"], s["family"]), {})[s["factor"]] = s
    order = sorted(by_family, key=lambda k: (k[0], -max(s["acc_pruned"] for s in by_family[k].values())))
    rows = []
    for model, fam in order:
        cells = [by_family[(model, fam)].get(f, {}) for f in factors]
        methods = ", ".join(dict.fromkeys(s["method"] for s in cells if s))
        seeds = "/".join(str(s.get("acc_pruned_n", "-")) if s else "-" for s in cells)
        rows.append((model, fam, methods, seeds, _per_budget(cells, "acc_pruned"), _per_budget(cells, "acc_finetuned")))
    dense = {r["model"]: r.get("acc_dense", r.get("test_acc")) for r in d["rows"] if r.get("method") == "dense"}
    budgets = " / ".join(f"{f:g}x" for f in factors)
    return ("### Accuracy after pruning on Fashion-MNIST (`python3 benchmarks/accuracy.py`)\n\n"
            f"Data: {d.get('data_set', 'Fashion-MNIST')}. Dense models (committed in benchmarks/models): {dense}. "
            f"Best row of each family at {budgets} fewer MACs (thop), mean over seeds; the protocol, the scope of "
            "each row and every method with its spread are in RESULTS.md.\n\n"
            + table(["model", "family", "best method(s)", "seeds", f"acc recalibrated, no fine-tune ({budgets})",
                     f"acc fine-tuned ({budgets})"], rows)
            + _verdict_compact(d.get("verdict"), "The library's default OBA")
            + _verdict_compact(d.get("verdict_paper_oba"), "The paper's criterion")
            + "\n\n![accuracy](benchmarks/results/accuracy.png)\n\nPer-layer widths of the rows above at 3x and at 2x "
            "(seed 0; the other seeds' 3x plots: accuracy_widths_s1.png, _s2.png):\n\n"
            "![widths at 3x](benchmarks/results/accuracy_widths.png)\n\n"
            "![widths at 2x](benchmarks/results/accuracy_widths_2x.png)")


COLUMN_NAMES = {"acc_pruned": "recalibrated", "acc_finetuned": "fine-tuned"}  # the verdict tables' words


def _verdict(v, lead: str = "The library's default OBA") -> str:
    """The issue's test per cell, every number (RESULTS.md): ``v``'s configuration against the best baseline."""
    if not v or not v.get("cells"):
        return ""
    rows = [(c["model"], f"{c['factor']:g}x", COLUMN_NAMES[c["column"]], f"{c['default']:.3f} ± {c['default_std']:.3f} "
             f"(n={c['default_n']}, MACs {c.get('default_macs_kept') or 0:.3f})",
             f"{c['best_baseline']} {c['best']:.3f} ± {c['best_std']:.3f} (n={c['best_n']}, MACs "
             f"{c.get('best_macs_kept') or 0:.3f})",
             f"{c['margin']:+.3f}", "yes" if c["within_one_std"] else "**no**") for c in v["cells"]]
    means = ", ".join(f"{COLUMN_NAMES[k]} {m:+.3f}" for k, m in v["mean_margin"].items())
    return (f"\n\n{lead} (`importance=\"{v.get('name')}\"` with its defaults) against the best baseline in each "
            f"cell ({v['rule']}). Mean margin: {means}; all cells within one std: "
            f"{'yes' if v['all_within_one_std'] else 'no'}.\n\n"
            + table(["model", "MACs /", "column", v.get("name"), "best baseline", "margin", "within one std"], rows))


def _verdict_compact(v, lead: str) -> str:
    """The same test in one line per model and column: means and margins at each budget (spreads: RESULTS.md)."""
    if not v or not v.get("cells"):
        return ""
    lines: Dict[tuple, list] = {}
    for c in v["cells"]:
        mark = "" if c["within_one_std"] else " **no**"
        lines.setdefault((c["model"], COLUMN_NAMES[c["column"]]), []).append(
            f"{c['factor']:g}x {c['default']:.3f} (n={c['default_n']}) vs {c['best_baseline']} {c['best']:.3f}: "
            f"{c['margin']:+.3f}{mark}")
    means = ", ".join(f"{COLUMN_NAMES[k]} {m:+.3f}" for k, m in v["mean_margin"].items())
    within = sum(c["within_one_std"] for c in v["cells"])
    return (f"\n\n{lead} (`importance=\"{v.get('name')}\"` with its defaults) against the best baseline: {within} "
            f"of {len(v['cells'])} cells within one std (mean >= best mean - pooled std); "
            f"mean margin: {means}.\n\n"
            + table(["model", "column", "per budget: mean (seeds) vs best baseline: margin"],
                    [(m, c, "; ".join(parts)) for (m, c), parts in lines.items()]))


def accuracy_full(d: Dict) -> str:
    """Every method's summary row, for RESULTS.md."""
    rows = [(s["model"], f"{s['factor']:g}x", s["method"], s.get("family", ""), f"{s['macs_ratio']:.3f}",
             f"{s['params_ratio']:.2f}", _acc(s, "acc_pruned"), _acc(s, "acc_finetuned"),
             f"{s.get('prune_seconds', 0):.0f}")
            for s in sorted(d["summary"], key=lambda s: (s["model"], s["factor"], -s.get("acc_pruned", 0)))]
    how = "\n".join(f"`{c}`  " for c in (d.get("commands") or [d.get("command", "")]))
    notes = "".join(f" {d[k]}" for k in ("tp_hessian_note", "tp_vit_note") if d.get(k))
    return ("### Accuracy after pruning on Fashion-MNIST: every method\n\n" + how + "\n\n"
            f"{d.get('protocol', '')}{notes}\n\n" + (f"{d['scope_note']}\n\n" if d.get("scope_note") else "")
            + table(["model", "MACs /", "method", "family", "MACs kept", "params kept", "acc recalibrated",
                     "acc fine-tuned", "prune s"], rows)
            + _verdict(d.get("verdict")) + _verdict(d.get("verdict_paper_oba"), "The paper's criterion"))


def _same_plan(dist: Dict) -> str:
    if not dist:
        return ""
    same = dist.get("same_plan_all_ranks") and dist.get("same_plan_as_single")
    return ("Every rank ends with the single process's plan." if same else
            "**The ranks' plans differ from each other or from the single process's.**")


def hf_scale(d: Dict) -> str:
    """OBA on a ~100M-parameter LLaMA: time and peak memory, one process and under torchrun."""
    runs = [("1 process", d["single"])] + [(f"torchrun x{d['torchrun_x2']['world_size']}, rank {r['rank']}", r)
                                           for r in d.get("torchrun_x2", {}).get("ranks", [])]
    rows = [(name, f"{r['wall_s']:.0f}", f"{r['seconds'].get('score', 0):.0f}", f"{r['peak_rss_mb'] / 1024:.1f}",
             f"{r['params_before'] / 1e6:.0f}M -> {r['params_after'] / 1e6:.0f}M", f"{r['flops_ratio']:.3f}",
             f"{r['masked_error']:.1e}") for name, r in runs]
    p = d["protocol"]
    return ("### OBA on a ~100M-parameter LLaMA (`python3 benchmarks/hf_scale.py`; `torchrun --standalone "
            "--nproc_per_node=2 benchmarks/hf_scale.py`)\n\n"
            f"Built from config ({p['config']['num_hidden_layers']} layers, hidden {p['config']['hidden_size']}, GQA "
            f"{p['config']['num_attention_heads']}/{p['config']['num_key_value_heads']}), captured with torch.export, "
            f"macs={p['macs']} by FlopCounterMode, {p['batches']} calibration batches of {p['batch_shape']} random "
            "tokens (timing only), 1 thread per process on a shared 2-core CPU (two ranks compete for it). "
            + _same_plan(d.get("torchrun_x2", {})) + "\n\n"
            + table(["run", "wall s", "score s", "peak RSS GB", "params", "FLOPs kept", "masked error"], rows))


def fixed_widths(d: Dict) -> str:
    """Selection alone: every criterion keeps the same count per group; accuracy per (model, keep fraction)."""
    cols = sorted({(s["model"], s["keep"]) for s in d["summary"]}, key=lambda c: (c[0], -c[1]))
    cell = {(s["model"], s["keep"], s["criterion"]): s for s in d["summary"]}
    crits = list(dict.fromkeys(s["criterion"] for s in d["summary"]))
    rows = [[c] + [(f"{cell[m, k, c]['acc']:.3f} ± {cell[m, k, c]['acc_std']:.3f} (n={cell[m, k, c]['n']})"
                    if (m, k, c) in cell else "-") for m, k in cols] for c in crits]
    return ("### Which channels a criterion keeps, at equal widths (`" + d["command"] + "`)\n\n"
            + f"{d['protocol']}\n\n" + table(["criterion"] + [f"{m}, keep {k:g}" for m, k in cols], rows))


def width_swap(d: Dict) -> str:
    """Per budget and seed: A and B, and A with one layer's kept set taken from B (and the converse)."""
    parts = []
    for r in d["rows"]:
        rows = [(name, r["widths_a"][name], r["widths_b"][name], f"{r['overlap'][name]:.2f}",
                 f"{r['a_with_b'][name]['acc']:.3f} (MACs {r['a_with_b'][name]['macs']:.3f})",
                 f"{r['b_with_a'][name]['acc']:.3f} (MACs {r['b_with_a'][name]['macs']:.3f})") for name in r["overlap"]]
        parts.append(f"{r['factor']:g}x, seed {r['seed']}: A = {d['a']} {r['a']:.3f} (MACs {r['macs_a']:.3f}), "
                     f"B = {d['b']} {r['b']:.3f} (MACs {r['macs_b']:.3f})\n\n"
                     + table(["layer", "A width", "B width", "overlap", "A with B's layer", "B with A's layer"], rows))
    return (f"### Swapping one layer's kept channels between two pruned {d['model']} models (`{d['command']}`)\n\n"
            + f"{d['protocol']}\n\n" + "\n\n".join(parts))
