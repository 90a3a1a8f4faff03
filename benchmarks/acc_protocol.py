"""The accuracy benchmark's protocol: one pruning trajectory per (model, method, seed), measured at every budget.

Used by benchmarks/accuracy.py. obafx methods prune the committed dense model on OBA's exponential MAC schedule
with ``steps_per_halving`` steps per halving of the MACs (20: 2x is reached after 20 steps, 3x after 32, 4x after
40), re-scoring on ``calib_batches`` fresh batches of ``calib_size`` training images before every step, with the
library recalibrating BatchNorm between steps. The trajectory is one chain of compile_prune calls, one per budget
segment (2x, then 2x->3x, then 3x->4x): the model at a budget is exactly the model the next segment starts from, so
one run serves every budget. At each budget a copy gets its BatchNorm statistics recalibrated on training batches
(no gradients) and is evaluated on the whole test set ("acc_pruned"); the fine-tune (same recipe and epochs for
every method) happens later, from the saved copy. Torch-Pruning's rows run once per budget (see acc_tp.py).
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

import obafx
from obafx.bench import augment
from obafx.bench import data as fmnist
from obafx.bench import train as training
from obafx.passes.macs import param_count, thop_macs

import acc_tp

# method -> (family, compile_prune keyword arguments; rank and OBA's unit_sum are explicit so that a row keeps its
# meaning when the library's defaults change). The family decides which rows get fine-tuned when not every
# row can be (the best of each family per cell).
# the group-exact score's settings every oba_group row below shares (they differ in confidence= and keep_widths=)
_GROUP_EXACT = dict(importance="oba_group", mode="full", train=True, rank="per_mac", probes=4)
METHODS: Dict[str, tuple] = {
    "oba_default": ("OBA", dict(importance="oba")),  # whatever the library's defaults are at the run's commit
    "oba_residual": ("OBA", dict(importance="oba", mode="residual", rank="score", unit_sum="signed")),
    "oba_full": ("OBA", dict(importance="oba", mode="full", rank="score", unit_sum="signed")),
    "oba_residual_train": ("OBA", dict(importance="oba", mode="residual", train=True, rank="score",
                                       unit_sum="signed")),
    "oba_group": ("OBA", dict(importance="oba_group", mode="residual", rank="score")),
    "oba_residual_permac": ("OBA", dict(importance="oba", mode="residual", rank="per_mac", unit_sum="signed")),
    # within-group mean normalisation, as Torch-Pruning's criteria do (its Taylor ranks channels steadily)
    "oba_residual_mean": ("OBA", dict(importance="oba", mode="residual", rank="score", normalizer="mean",
                                      unit_sum="signed")),
    "oba_residual_train_mean": ("OBA", dict(importance="oba", mode="residual", train=True, rank="score",
                                            normalizer="mean", unit_sum="signed")),
    "magnitude": ("magnitude", dict(importance="magnitude")),
    "taylor": ("Taylor", dict(importance="taylor")),
    "taylor_permac": ("Taylor", dict(importance="taylor", rank="per_mac")),  # the control for OBA's per-MAC ranking
    "taylor_mean": ("Taylor", dict(importance="taylor", rank="score", normalizer="mean")),  # control for *_mean
    # unit_sum="abs" (Σ|s_i| per unit) with the mean normaliser: Torch-Pruning's Taylor rule; the OBA rows put
    # OBA's scores through the same rule
    "taylor_abs": ("Taylor", dict(importance="taylor", rank="score", normalizer="mean", unit_sum="abs")),
    "oba_residual_abs": ("OBA", dict(importance="oba", mode="residual", rank="score", normalizer="mean",
                                     unit_sum="abs")),
    "oba_full_abs": ("OBA", dict(importance="oba", mode="full", rank="score", normalizer="mean", unit_sum="abs")),
    "oba_residual_permac_abs": ("OBA", dict(importance="oba", mode="residual", rank="per_mac", unit_sum="abs")),
    "oba_residual_permac_member": ("OBA", dict(importance="oba", mode="residual", rank="per_mac", unit_sum="member")),
    "oba_residual_permac_abs_train": ("OBA", dict(importance="oba", mode="residual", train=True, rank="per_mac",
                                                  unit_sum="abs")),
    "oba_residual_abs_train": ("OBA", dict(importance="oba", mode="residual", train=True, rank="score",
                                           normalizer="mean", unit_sum="abs")),
    "oba_residual_permac_member_train": ("OBA", dict(importance="oba", mode="residual", train=True,
                                                     rank="per_mac", unit_sum="member")),
    # controls for the train-mode OBA rows: the baselines' scores with BatchNorm on batch statistics too
    "taylor_train": ("Taylor", dict(importance="taylor", train=True)),
    "taylor_abs_train": ("Taylor", dict(importance="taylor", rank="score", normalizer="mean", unit_sum="abs",
                                        train=True)),
    # the group-exact score (ΔL_u = -g_u'θ_u + ½θ_u'Hθ_u per unit, Rademacher probes) with the full Hessian in train
    # mode, ranked per MAC: the estimate closest to the true single-unit loss change (benchmarks/score_truth.py)
    "oba_group_full_permac_train": ("OBA", dict(_GROUP_EXACT, confidence=0.0)),
    # ... ranked by an upper confidence bound, mean + 1 standard error over the batch x probe samples (oba_group's
    # defaults from 8909172 to 2026-12-07): a unit goes early only when its loss change is low with confidence
    "oba_group_ucb": ("OBA", dict(_GROUP_EXACT, confidence=1.0)),
    # ... with two standard errors instead of one (oba_group's defaults since 2026-12-07): how much of what the
    # bound fixes is the selection's luck (on the ViT, 23% of the stream's single removals lower the loss on the
    # images that chose them, 5% on other images: benchmarks/joint_removal.py)
    "oba_group_ucb2": ("OBA", dict(_GROUP_EXACT, confidence=2.0)),
    # ... with the ViT's residual stream kept at full width (keep_widths on the rows that write it; only the ViT has
    # attn.proj): what trimming the stream costs oba_group there (benchmarks/joint_removal.py: its units' costs do
    # not add up)
    "oba_group_ucb_keepstream": ("OBA", dict(_GROUP_EXACT, confidence=1.0, keep_widths=("*attn.proj.weight:0",))),
    "random": ("random", dict(importance="random")),
    "obd": ("OBD", dict(importance="obd")),
    "tp_taylor": ("Torch-Pruning", None),
    "tp_hessian": ("Torch-Pruning", None),
}
EXAMPLE = torch.zeros(1, 1, 32, 32)


def segment_steps(factors: List[float], steps_per_halving: int) -> List[int]:
    """Steps of each budget segment (ascending factors) on one exponential schedule: round(s/ln2 * ln(f_k/f_k-1))."""
    out, prev = [], 1.0
    for f in factors:
        out.append(max(1, round(steps_per_halving * math.log(f / prev) / math.log(2))))
        prev = f
    return out


def widths(model: torch.nn.Module) -> Dict[str, int]:
    """Output width of every Conv2d / Linear, by module name (the per-layer widths a pruning chose)."""
    return {name: (m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features)
            for name, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}


def recal_batches(train_set, cfg: Dict[str, Any], seed: int) -> List:
    """The training batches used to recalibrate BatchNorm after pruning (fixed per seed: reproducible)."""
    return fmnist.calibration_batches(train_set, cfg["recal_batches"], cfg["recal_size"], seed=seed + 10_000)


def _recalibrate(model, batches) -> None:
    training.recalibrate_bn(model, batches, n_batches=len(batches))


def measure(dense, pruned, test_loader, cfg) -> Dict[str, Any]:
    """MACs and params kept (thop, fractions and counts), per-layer widths, test accuracy of ``pruned``."""
    macs0, macs1 = thop_macs(dense, (EXAMPLE,))[0], thop_macs(pruned, (EXAMPLE,))[0]
    p0, p1 = param_count(dense), param_count(pruned)
    return {"macs_ratio": macs1 / macs0, "macs": macs1, "params_ratio": p1 / p0, "params": p1,
            "widths": widths(pruned),
            "acc_pruned": training.evaluate(pruned, test_loader, limit_batches=cfg["eval_batches"])}


def _report_groups(pruned) -> List[Dict[str, Any]]:
    """The report's groups of the last compile_prune call (id, width_before, width_after); [] when absent."""
    try:
        return [{k: g[k] for k in ("id", "width_before", "width_after")} for g in obafx.report(pruned).groups]
    except (obafx.ConfigError, KeyError):  # Torch-Pruning rows carry no obafx report
        return []


def trajectory(name: str, dense, method: str, seed: int, cfg: Dict[str, Any], data, snapshot_dir: Optional[Path]):
    """Prune ``dense`` with obafx ``method`` through every budget of cfg["factors"]; one row per budget.

    In: model name, dense model (not modified), method, seed, config, (train_set, test_loader), a folder for the
    pruned models (None: not saved). Out: rows with the budget's measurements, kwargs, steps and seconds so far.
    """
    train_set, test_loader = data
    family, kwargs = METHODS[method]
    factors = sorted(cfg["factors"])
    macs0 = thop_macs(dense, (EXAMPLE,))[0]
    current, done, seconds, rows = dense, 0, 0.0, []
    for factor, n in zip(factors, segment_steps(factors, cfg["steps_per_halving"])):
        batches = [b for s in range(done, done + n) for b in fmnist.calibration_batches(
            train_set, cfg["calib_batches"], cfg["calib_size"], seed=seed, step=s)]
        keep = (macs0 / factor) / thop_macs(current, (EXAMPLE,))[0]
        torch.manual_seed(seed)
        start = time.perf_counter()
        current = obafx.compile_prune(current, EXAMPLE, data=batches, macs=keep, steps=n,
                                      batches_per_step=cfg["calib_batches"], seed=seed * 1000 + done, verify=False,
                                      **kwargs)
        seconds += time.perf_counter() - start
        done += n
        groups = _report_groups(current)
        _recalibrate(current, recal_batches(train_set, cfg, seed))  # also the start of the next segment
        row = {"model": name, "method": method, "family": family, "factor": factor, "seed": seed,
               "kwargs": kwargs, "steps": done, "prune_seconds": round(seconds, 1), "groups": groups,
               **measure(dense, current, test_loader, cfg)}
        rows.append(_saved(row, current, snapshot_dir))
    return rows


def tp_rows(name: str, dense, method: str, seed: int, cfg: Dict[str, Any], data, snapshot_dir: Optional[Path]):
    """Torch-Pruning ``method``: one run per budget with as many steps as obafx's trajectory takes to reach it."""
    train_set, test_loader = data
    factors, rows, done = sorted(cfg["factors"]), [], 0
    for factor, n in zip(factors, segment_steps(factors, cfg["steps_per_halving"])):
        done += n
        batches = [b for s in range(done) for b in fmnist.calibration_batches(
            train_set, cfg["calib_batches"], cfg["calib_size"], seed=seed, step=s)]
        start = time.perf_counter()
        pruned, _ = acc_tp.prune_tp(dense, EXAMPLE, method, 1.0 / factor, batches, done, seed, _recalibrate)
        seconds = time.perf_counter() - start
        _recalibrate(pruned, recal_batches(train_set, cfg, seed))
        row = {"model": name, "method": method, "family": "Torch-Pruning", "factor": factor, "seed": seed,
               "kwargs": {"tp_tries": acc_tp.TP_TRIES}, "steps": done, "prune_seconds": round(seconds, 1),
               "groups": [], **measure(dense, pruned, test_loader, cfg)}
        rows.append(_saved(row, pruned, snapshot_dir))
    return rows


def snapshot_path(folder: Path, row: Dict[str, Any]) -> Path:
    return Path(folder) / f"{row['model']}-{row['method']}-{row['factor']:g}x-s{row['seed']}.pt"


def _saved(row: Dict[str, Any], model, folder: Optional[Path]) -> Dict[str, Any]:
    """Save the recalibrated pruned model (whole module, pickled: a private cache for the fine-tune phase)."""
    if folder is not None:
        path = snapshot_path(folder, row)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model, path)
        row["snapshot"] = str(path)
    return row


def finetune_row(row: Dict[str, Any], model, train_set, test_loader, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Fine-tune a pruned model with the common recipe (SGD/AdamW, cosine, crop+flip), evaluate; returns the row."""
    loader = augment.Augmented(fmnist.batch_loader(train_set, 128, shuffle=True, seed=row["seed"]), seed=row["seed"])
    start = time.perf_counter()
    if cfg["finetune_steps"]:
        training.finetune(model, loader, steps=cfg["finetune_steps"], seed=row["seed"])
    else:
        training.finetune(model, loader, epochs=cfg["finetune_epochs"], seed=row["seed"])
    row["finetune_seconds"] = round(time.perf_counter() - start, 1)
    row["acc_finetuned"] = training.evaluate(model, test_loader, limit_batches=cfg["eval_batches"])
    return row


def run_method(name: str, dense, method: str, seed: int, cfg, data, snapshot_dir) -> List[Dict[str, Any]]:
    """All budgets of one (model, method, seed); fine-tunes each row in place when cfg["finetune"] == "all"."""
    if method not in METHODS:
        raise obafx.ConfigError(f"unknown method {method!r}. What to do: pick from {sorted(METHODS)}.")
    fn = tp_rows if method in acc_tp.TP_METHODS else trajectory
    rows = fn(name, dense, method, seed, cfg, data, snapshot_dir)
    if cfg.get("finetune") == "all":
        for row in rows:
            finetune_row(row, torch.load(row["snapshot"], weights_only=False), data[0], data[1], cfg)
    return rows
