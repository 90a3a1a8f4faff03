"""The accuracy benchmark's results: merging per-process files, the summary over seeds, the plots.

Used by benchmarks/accuracy.py. A row is one (model, method, factor, seed); the fine-tune phase writes the same rows
again with ``acc_finetuned`` added, so merging keeps one row per key with every field any part gave it.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

Key = Tuple[str, str, float, int]
FIELDS = ("acc_pruned", "acc_finetuned", "macs_ratio", "params_ratio", "prune_seconds")


def key(row: Dict[str, Any]) -> Key:
    return (row["model"], row["method"], row.get("factor", 0.0), row.get("seed", -1))


def merge_rows(parts: List[List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """One row per key, fields of later parts added to (and overriding) earlier ones; errors never override data."""
    merged: Dict[Key, Dict[str, Any]] = {}
    for rows in parts:
        for row in rows:
            old = merged.get(key(row))
            if old is not None and "error" in row and "error" not in old:
                continue
            merged[key(row)] = {**(old or {}), **row}
            if "error" not in row:
                merged[key(row)].pop("error", None)
    return list(merged.values())


def summarise(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Mean and population std over seeds per (model, method, factor), for each measured field."""
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        if r["method"] != "dense" and "acc_pruned" in r:
            groups.setdefault((r["model"], r["method"], r["factor"]), []).append(r)
    out = []
    for (model, method, factor), rs in sorted(groups.items()):
        entry = {"model": model, "method": method, "family": rs[0].get("family"), "factor": factor, "seeds": len(rs)}
        for k in FIELDS:
            vals = [r[k] for r in rs if k in r]
            if vals:
                entry[k] = statistics.fmean(vals)
                entry[k + "_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
                entry[k + "_n"] = len(vals)
        out.append(entry)
    return out


def best_per_family(summary: List[Dict[str, Any]], field: str = "acc_pruned") -> Dict[tuple, str]:
    """(model, factor, family) -> the method with the highest mean ``field`` (the rows to fine-tune)."""
    best: Dict[tuple, Dict[str, Any]] = {}
    for s in summary:
        k = (s["model"], s["factor"], s["family"])
        if field in s and (k not in best or s[field] > best[k][field]):
            best[k] = s
    return {k: s["method"] for k, s in best.items()}


# the library's default OBA configuration: importance="oba_group" with its defaults (full H, train mode, 4 probes,
# per MAC, confidence 2.0; the README's example and `obafx demo` use it since 2026-12-07). Its defaults before
# then were confidence 1.0 (oba_group_ucb, from 8909172).
DEFAULT_METHODS = ("oba_group_ucb2",)
# importance="oba" with its defaults: the paper's per-parameter criterion (the verdict's "default OBA" until
# 2026-12-07; its defaults before 2026-12-02 were oba_residual_permac_abs)
PAPER_METHODS = ("oba_default", "oba_residual_permac_member_train")
COLUMNS = ("acc_pruned", "acc_finetuned")


def verdicts(summary: List[Dict[str, Any]], methods=DEFAULT_METHODS, name: str = "oba_group") -> Dict[str, Any]:
    """The issue's test, per (model, factor, column): the library's default OBA (rows of ``methods``; ``name`` says
    which configuration that is) against the best baseline.

    Baselines are the rows of every family but OBA. A cell is ``within_one_std`` when the default's mean is at
    least the best baseline's mean minus the pooled std of the two rows (sqrt of the mean of the two variances, over
    seeds); ``margin`` is default minus best. Returns the cells, the mean margin per column and overall, and
    whether every cell is within one std. Cells where either side has one seed are flagged ``one_seed``; both
    sides' mean MACs kept are recorded (Torch-Pruning's runs do not land exactly on the budget).
    """
    cells = []
    for (model, factor) in sorted({(s["model"], s["factor"]) for s in summary}):
        here = [s for s in summary if s["model"] == model and s["factor"] == factor]
        for col in COLUMNS:
            default = max((s for s in here if s["method"] in methods and col in s),
                          key=lambda s: s[col + "_n"], default=None)
            base = [s for s in here if s.get("family") != "OBA" and col in s]
            if default is None or not base:
                continue
            best = max(base, key=lambda s: s[col])
            pooled = ((default[col + "_std"] ** 2 + best[col + "_std"] ** 2) / 2) ** 0.5
            cells.append({"model": model, "factor": factor, "column": col, "default": default[col],
                          "default_std": default[col + "_std"], "default_n": default[col + "_n"],
                          "best_baseline": best["method"], "best": best[col], "best_std": best[col + "_std"],
                          "best_n": best[col + "_n"], "margin": default[col] - best[col], "pooled_std": pooled,
                          "default_macs_kept": default.get("macs_ratio"), "best_macs_kept": best.get("macs_ratio"),
                          "within_one_std": default[col] >= best[col] - pooled,
                          "one_seed": min(default[col + "_n"], best[col + "_n"]) < 2})
    mean = {col: statistics.fmean(c["margin"] for c in cells if c["column"] == col)
            for col in COLUMNS if any(c["column"] == col for c in cells)}
    return {"rule": f"{name} mean >= best baseline mean - pooled std (per cell); margin = {name} - best",
            "name": name, "cells": cells, "mean_margin": mean,
            "mean_margin_all": statistics.fmean(c["margin"] for c in cells) if cells else None,
            "all_within_one_std": bool(cells) and all(c["within_one_std"] for c in cells)}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_accuracy(summary: List[Dict[str, Any]], path: Path) -> None:
    """Accuracy against MACs kept, one line per method; one row of panels per column (recalibrated, fine-tuned)."""
    plt = _plt()
    models = sorted({s["model"] for s in summary})
    cols = [c for c in ("acc_pruned", "acc_finetuned") if any(c in s for s in summary)]
    fig, axes = plt.subplots(len(cols), len(models), figsize=(5 * len(models), 4 * len(cols)), squeeze=False)
    for i, col in enumerate(cols):
        for ax, model in zip(axes[i], models):
            for method in sorted({s["method"] for s in summary if s["model"] == model and col in s}):
                pts = sorted((s["macs_ratio"], s[col], s[col + "_std"]) for s in summary
                             if s["model"] == model and s["method"] == method and col in s)
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                            capsize=3, label=method)
            ax.set_title(f"{model}: {'recalibrated, no fine-tune' if col == 'acc_pruned' else 'fine-tuned'}")
            ax.set_xlabel("MACs kept (fraction, thop)")
            ax.set_ylabel("test accuracy")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def headline_methods(summary: List[Dict[str, Any]], factor: float) -> Dict[str, set]:
    """Per model, the methods the README's headline shows at ``factor``: the library's default OBA, the paper's
    criterion, and the best row (by mean acc_pruned) of every family."""
    best = best_per_family([s for s in summary if s["factor"] == factor])
    shown: Dict[str, set] = {}
    for (model, _, _), method in best.items():
        shown.setdefault(model, set()).add(method)
    for s in summary:
        if s["method"] in DEFAULT_METHODS + PAPER_METHODS:
            shown.setdefault(s["model"], set()).add(s["method"])
    return shown


def plot_widths(rows: List[Dict[str, Any]], dense_widths: Dict[str, Dict[str, int]], factor: float, seed: int,
                path: Path, methods: Optional[Dict[str, set]] = None) -> None:
    """Width kept (fraction of the dense width) per layer, one line per method, for one budget and seed.
    ``methods``: model -> the methods to draw (default: every method with widths)."""
    plt = _plt()
    models = sorted({r["model"] for r in rows if r.get("factor") == factor and "widths" in r})
    if not models:
        return
    fig, axes = plt.subplots(len(models), 1, figsize=(12, 4 * len(models)), squeeze=False)
    for ax, model in zip(axes[:, 0], models):
        layers = list(dense_widths.get(model, {}))[:-1]  # the classifier's width is fixed
        drawn = methods.get(model, set()) if methods is not None else None
        for r in sorted((r for r in rows if r["model"] == model and r.get("factor") == factor
                         and r.get("seed") == seed and "widths" in r
                         and (drawn is None or r["method"] in drawn)), key=lambda r: r["method"]):
            ax.plot(range(len(layers)), [r["widths"].get(n, 0) / dense_widths[model][n] for n in layers],
                    marker=".", linewidth=2.5 if r["method"] in DEFAULT_METHODS else 1.0,
                    label=f"{r['method']} ({r.get('params_ratio', 0):.2f} params)")
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=90, fontsize=6)
        ax.set_ylabel("width kept (fraction)")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{model}: per-layer widths at {factor:g}x fewer MACs, seed {seed}")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
