"""The pruning table on real data: accuracy vs MACs for OBA and the baselines, on Fashion-MNIST models.

    python3 benchmarks/accuracy.py                      # default grid (long: see --help), writes
                                                        # benchmarks/results/accuracy.json and accuracy.png
    python3 benchmarks/accuracy.py --quick --out /tmp/a.json   # smoke run (seconds)

Protocol, the same for every method (OBA.md section 4, scaled to a CPU): the cached trained model
(obafx.bench.train.trained), pruned toward 1/2, 1/3, 1/4 of its MACs in ``--steps`` steps on the exponential schedule,
re-scoring on fresh calibration batches before each step; then BatchNorm statistics recalibrated on training
batches (no gradients) and accuracy measured ("pruned"); then the same short fine-tuning for every method and
accuracy measured again ("finetuned"). Methods: obafx's oba (full), oba (residual), magnitude, taylor, obd
(Hutchinson diagonal), random; Torch-Pruning's own MetaPruner with its GroupTaylorImportance and its
GroupHessianImportance (empirical-Fisher OBD; its accumulate_grad keeps only the last sample in 1.6.1, so we
accumulate per-sample squared gradients correctly and record that). Several seeds (calibration batches, random
scores, fine-tuning order); mean and spread reported.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_json  # noqa: E402

import obafx  # noqa: E402
from obafx.bench import data as fmnist  # noqa: E402
from obafx.bench import train as training  # noqa: E402
from obafx.bench.models import Attention  # noqa: E402
from obafx.passes.macs import param_count, thop_macs  # noqa: E402

OBAFX_METHODS = {"oba_full": ("oba", "full"), "oba_residual": ("oba", "residual"), "magnitude": ("magnitude", None),
                 "taylor": ("taylor", None), "obd": ("obd", None), "random": ("random", None)}
TP_METHODS = ("tp_taylor", "tp_hessian")
TP_TRIES = 4  # full Torch-Pruning runs allowed to land its MACs within 2% of the target


def _classifier(model) -> torch.nn.Module:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]


def prune_obafx(model, example, method: str, factor: float, batches: List, steps: int, seed: int):
    importance, mode = OBAFX_METHODS[method]
    return obafx.compile_prune(model, example, importance=importance, mode=mode or "full", data=batches,
                               macs=1.0 / factor, steps=steps, batches_per_step=len(batches) // steps, seed=seed,
                               verify=False)


class _FixedHessian:
    """Torch-Pruning's GroupHessianImportance with per-sample squared gradients accumulated over all samples."""

    @staticmethod
    def make():
        import torch_pruning as tp

        class Fixed(tp.importance.GroupHessianImportance):
            def accumulate_grad(self, model):
                for _, param in model.named_parameters():
                    if param.grad is not None:
                        sq = param.grad.detach().clone().pow(2)
                        self._accu_grad[param] = self._accu_grad.get(param, 0) + sq
                        self._counter[param] = self._counter.get(param, 0) + 1
        return Fixed()


def prune_tp(model, example, method: str, factor: float, batches: List, steps: int, seed: int):
    """Torch-Pruning's MetaPruner with its own criterion, iterative, toward the MAC target (global ranking).

    Its pruner takes a channel ratio, not a MAC budget, and with global ranking the MACs a ratio gives depend on
    the criterion: the ratio is first found for magnitude (cheap), then corrected from each full run (MACs ~
    (1 - ratio)^a) until the MACs (thop, the count obafx's budgets use) are within 2% of the target, at most
    ``TP_TRIES`` full runs (the closest is kept; the row records the MACs it reached). TP's own counter also
    counts attention matmuls, so on the ViT it would stop at a different budget."""
    keep = 1.0 / factor
    base, _ = thop_macs(model, (example,))
    ratio, best = _tp_ratio_for(model, example, keep, base), None
    for _ in range(TP_TRIES):
        pruned = _tp_run(model, example, method, ratio, batches, steps, seed)
        kept = thop_macs(pruned, (example,))[0] / base
        if best is None or abs(kept - keep) < abs(best[1] - keep):
            best = (pruned, kept)
        if abs(kept / keep - 1) <= 0.02 or not 0 < kept < 1:
            break
        a = np.log(kept) / np.log(1 - ratio)
        ratio = float(np.clip(1 - keep ** (1 / max(a, 0.2)), 0.01, 0.95))
    return best[0]


def _tp_run(model, example, method: str, ratio: float, batches: List, steps: int, seed: int):
    """One iterative MetaPruner run at channel ``ratio`` with Torch-Pruning's Taylor or (fixed) Hessian criterion."""
    import torch_pruning as tp

    torch.manual_seed(seed)
    model = copy.deepcopy(model).eval()
    imp = tp.importance.GroupTaylorImportance() if method == "tp_taylor" else _FixedHessian.make()
    pruner = tp.pruner.MetaPruner(model, example, importance=imp, pruning_ratio=ratio, iterative_steps=steps,
                                  ignored_layers=_tp_ignored(model), global_pruning=True)
    per = max(1, len(batches) // steps)
    for s in range(steps):
        chunk = batches[s * per:(s + 1) * per]
        model.zero_grad()
        if method == "tp_taylor":
            for x, y in chunk:
                (F.cross_entropy(model(x), y) / len(chunk)).backward()
        else:
            imp.zero_grad()
            for x, y in chunk:
                for xi, yi in zip(x.split(1), y.split(1)):  # per-sample gradients, as its docs require
                    model.zero_grad()
                    F.cross_entropy(model(xi), yi).backward()
                    imp.accumulate_grad(model)
        pruner.step()
    model.zero_grad(set_to_none=True)
    return model


TP_HESSIAN_NOTE = ("per-sample squared gradients accumulated over every calibration sample (Torch-Pruning "
                   "1.6.1's accumulate_grad keeps only the last)")
TP_VIT_NOTE = ("on vit_tiny, Torch-Pruning's rows keep the qkv layers' width (ignored_layers): its pruner raises "
               "IndexError on the qkv reshape into heads, with or without num_heads=")


def _tp_ignored(model) -> List[torch.nn.Module]:
    """What Torch-Pruning must leave alone: the classifier, and the ViT's qkv layers. On qkv reshaped into heads
    (``reshape(B, N, 3, -1, head_dim)``) its pruner raises IndexError, with or without ``num_heads=`` (head dims or
    whole heads); keeping qkv's width is the workaround, so TP prunes the MLPs and the residual stream there."""
    return [_classifier(model)] + [m.qkv for m in model.modules() if isinstance(m, Attention)]


def _tp_ratio_for(model, example, keep: float, base: float) -> float:
    """The channel ratio at which Torch-Pruning's magnitude pruner keeps ``keep`` of the MACs (bisection)."""
    import torch_pruning as tp

    lo, hi = 0.0, 0.95
    for _ in range(8):
        mid = (lo + hi) / 2
        m = copy.deepcopy(model)
        tp.pruner.MetaPruner(m, example, importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=mid,
                             ignored_layers=_tp_ignored(m), global_pruning=True).step()
        macs, _ = thop_macs(m, (example,))
        lo, hi = (mid, hi) if macs > keep * base else (lo, mid)
    return hi


def run_one(name: str, model, method: str, factor: float, seed: int, cfg: Dict[str, Any], loaders) -> Dict[str, Any]:
    train_loader, test_loader = loaders
    example = torch.zeros(1, 1, 32, 32)
    batches = [b for s in range(cfg["steps"]) for b in fmnist.calibration_batches(
        train_loader.dataset, cfg["calib_batches"], cfg["calib_size"], seed=seed, step=s)]
    torch.manual_seed(seed)
    start = time.perf_counter()
    pruner = prune_tp if method in TP_METHODS else prune_obafx
    pruned = pruner(model, example, method, factor, batches, cfg["steps"], seed)
    seconds = time.perf_counter() - start
    macs0, _ = thop_macs(model, (example,))
    macs1, _ = thop_macs(pruned, (example,))
    training.recalibrate_bn(pruned, train_loader, n_batches=cfg["recal_batches"])
    acc_pruned = training.evaluate(pruned, test_loader, limit_batches=cfg["eval_batches"])
    training.finetune(pruned, train_loader, steps=cfg["finetune_steps"], seed=seed, progress=False)
    acc_tuned = training.evaluate(pruned, test_loader, limit_batches=cfg["eval_batches"])
    return {"model": name, "method": method, "factor": factor, "seed": seed, "macs_ratio": macs1 / macs0,
            "params_ratio": param_count(pruned) / param_count(model), "acc_pruned": acc_pruned,
            "acc_finetuned": acc_tuned, "prune_seconds": seconds}


def summarise(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Mean and spread (population std, min, max) over seeds per (model, method, factor)."""
    keys = sorted({(r["model"], r["method"], r["factor"]) for r in rows if "acc_finetuned" in r})
    out = []
    for model, method, factor in keys:
        rs = [r for r in rows if "acc_finetuned" in r and (r["model"], r["method"], r["factor"]) == (model, method, factor)]
        entry = {"model": model, "method": method, "factor": factor, "seeds": len(rs)}
        for k in ("acc_pruned", "acc_finetuned", "macs_ratio", "params_ratio", "prune_seconds"):
            vals = [r[k] for r in rs]
            entry[k] = statistics.fmean(vals)
            entry[k + "_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
        out.append(entry)
    return out


def plot(summary: List[Dict[str, Any]], path: Path) -> None:
    """Accuracy after fine-tuning against MACs kept, one line per method, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({s["model"] for s in summary})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for method in sorted({s["method"] for s in summary if s["model"] == model}):
            pts = sorted((s["macs_ratio"], s["acc_finetuned"], s["acc_finetuned_std"]) for s in summary
                         if s["model"] == model and s["method"] == method)
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                        capsize=3, label=method)
        ax.set_xlim(0.0, max(0.6, max(s["macs_ratio"] for s in summary) + 0.05))  # one scale for every panel
        ax.set_title(model)
        ax.set_xlabel("MACs kept (fraction)")
        ax.set_ylabel("test accuracy after fine-tuning")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def config(args) -> Dict[str, Any]:
    if args.quick:
        return dict(models=["resnet20"], methods=["oba_full", "magnitude", "tp_taylor"], factors=[2.0], seeds=[0],
                    steps=1, calib_batches=1, calib_size=16, recal_batches=2, finetune_steps=2, eval_batches=1,
                    train_limit=2000, test_limit=500, epochs=0.02)
    return dict(models=args.models.split(","), methods=args.methods.split(","),
                factors=[float(f) for f in args.factors.split(",")], seeds=list(range(args.seeds)), steps=args.steps,
                calib_batches=args.calib_batches, calib_size=64, recal_batches=20,
                finetune_steps=args.finetune_steps, eval_batches=args.eval_batches, train_limit=None, test_limit=None, epochs=None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet20,vgg_bn,vit_tiny")
    p.add_argument("--methods", default=",".join(list(OBAFX_METHODS) + list(TP_METHODS)))
    p.add_argument("--factors", default="2,3,4", help="MAC reduction factors")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--calib-batches", type=int, default=4, help="calibration batches (of 64) per step")
    p.add_argument("--finetune-steps", type=int, default=200)
    p.add_argument("--eval-batches", type=int, default=None,
                   help="test batches (of 128) per evaluation (default: the whole 10k test set)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 when several jobs share the cores)")
    p.add_argument("--merge", default=None,
                   help="comma-separated JSON files of earlier runs (e.g. one per model, run side by side): their "
                        "rows are combined into --out and the plot; nothing is run")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="benchmarks/results/accuracy.json")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge.split(","), Path(args.out))
    cfg = config(args)
    training.set_threads(args.threads)
    loaders = fmnist.loaders(batch_size=128, train_limit=cfg["train_limit"], test_limit=cfg["test_limit"])
    rows: List[Dict[str, Any]] = []
    out = Path(args.out)
    for name in cfg["models"]:
        data_kw = {"train_limit": cfg["train_limit"]} if cfg["train_limit"] else None
        model = training.trained(name, epochs=cfg["epochs"], data_kw=data_kw, progress=False)
        dense = training.evaluate(model, loaders[1], limit_batches=cfg["eval_batches"])
        rows.append({"model": name, "method": "dense", "acc_dense": dense})
        for factor in cfg["factors"]:
            for method in cfg["methods"]:
                for seed in cfg["seeds"]:
                    try:
                        rows.append(run_one(name, model, method, factor, seed, cfg, loaders))
                    except Exception as exc:  # one failing method must not lose the others' results
                        rows.append({"model": name, "method": method, "factor": factor, "seed": seed,
                                     "error": f"{type(exc).__name__}: {exc}"[:500]})
                    print(rows[-1], flush=True)
                    _write(out, args, cfg, rows)
    _write(out, args, cfg, rows)
    if not args.quick:
        plot(summarise(rows), out.with_suffix(".png"))
    return 0


def merge(paths: List[str], out: Path) -> int:
    """Combine the rows of several result files (e.g. one per model or budget, run side by side) into ``out`` and
    its plot; the JSON keeps every part's command and config and one reproducing command per protocol."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    rows = [r for part in parts for r in part["rows"]]
    write_json(str(out), {"command": f"python3 benchmarks/accuracy.py --merge {','.join(paths)} --out {out}",
                          "reproduce": _reproduce_commands(parts), "commands": [part["command"] for part in parts],
                          "config": [part["config"] for part in parts],
                          "machine": parts[0]["machine"], "tp_hessian_note": TP_HESSIAN_NOTE,
                          "tp_vit_note": TP_VIT_NOTE, "rows": rows, "summary": summarise(rows)})
    plot(summarise(rows), out.with_suffix(".png"))
    return 0


def _reproduce_commands(parts: List[Dict[str, Any]]) -> List[str]:
    """One command per distinct protocol among ``parts``, with the budgets of all parts that share it."""
    factors: Dict[tuple, set] = {}
    for part in parts:
        c = part["config"]
        key = (tuple(c["models"]), tuple(c["methods"]), len(c["seeds"]), c["steps"], c["finetune_steps"],
               c.get("eval_batches"))
        factors.setdefault(key, set()).update(r["factor"] for r in part["rows"] if "factor" in r)  # what ran
    commands = []
    for (models, methods, seeds, steps, finetune, eval_batches), fs in factors.items():
        commands.append(f"python3 benchmarks/accuracy.py --models {','.join(models)} --methods {','.join(methods)} "
                        f"--factors {','.join(f'{f:g}' for f in sorted(fs))} --seeds {seeds} --steps {steps} "
                        f"--finetune-steps {finetune}" + (f" --eval-batches {eval_batches}" if eval_batches else ""))
    return commands


def _write(out: Path, args, cfg, rows) -> None:
    write_json(str(out), {"command": "python3 benchmarks/accuracy.py " + " ".join(sys.argv[1:]), "config": cfg,
                          "machine": machine_info(), "tp_hessian_note": TP_HESSIAN_NOTE, "tp_vit_note": TP_VIT_NOTE,
                          "rows": rows, "summary": summarise(rows)})


if __name__ == "__main__":
    sys.exit(main())
