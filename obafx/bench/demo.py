"""`obafx demo`: the main job on a real example, end to end, in minutes on a CPU.

Load the committed CIFAR-style ResNet-20 trained on Fashion-MNIST (benchmarks/models; trained and cached if
absent), prune it with OBA's group-exact score (importance="oba_group": each channel's loss change from exact
Hessian-vector products; iterative, exponential schedule) to half the MACs, recalibrate BatchNorm, fine-tune
briefly, and print a before/after table: test accuracy, parameters, MACs, CPU latency and throughput.
Writes demo.json, the dumps and the pruned module (safetensors + plan) under --out.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import obafx
from obafx.bench import data as fmnist
from obafx.bench import dense
from obafx.bench import train as training
from obafx.bench.timing import interleaved


def _settings(quick: bool) -> dict:
    """Full run: ~10 minutes on 2 busy cores (pruning ~5.5 of them: 5 steps x 8 batches x 4 HVPs; the model is
    committed, so nothing is trained). Quick: a minute or two."""
    if quick:
        return dict(epochs=0.05, steps=2, calib_batches=2, calib_size=32, finetune_steps=5, test_limit=500,
                    train_limit=2000)
    return dict(epochs=None, steps=5, calib_batches=8, calib_size=64, finetune_steps=300, test_limit=None,
                train_limit=None)


def main(args) -> int:
    cfg = _settings(getattr(args, "quick", False))
    out = Path(getattr(args, "out", "obafx_out/demo"))
    out.mkdir(parents=True, exist_ok=True)
    training.set_threads()
    train_loader, test_loader = fmnist.loaders(batch_size=128, train_limit=cfg["train_limit"],
                                               test_limit=cfg["test_limit"])
    train_set = train_loader.dataset
    model = _dense_model(cfg)
    acc_dense = training.evaluate(model, test_loader, progress=True)

    print(f"2/4 prune with OBA to half the MACs in {cfg['steps']} steps (fresh calibration batches each step)")
    calib = [b for s in range(cfg["steps"]) for b in
             fmnist.calibration_batches(train_set, cfg["calib_batches"], cfg["calib_size"], seed=1, step=s)]
    example = torch.zeros(1, 1, 32, 32)
    start = time.perf_counter()
    pruned = obafx.compile_prune(model, example, importance="oba_group", data=calib, macs=0.5, steps=cfg["steps"],
                                 batches_per_step=cfg["calib_batches"], progress=True)
    prune_seconds = time.perf_counter() - start
    rep = obafx.report(pruned)

    print("3/4 recalibrate BatchNorm, then fine-tune briefly")
    training.recalibrate_bn(pruned, train_loader, n_batches=20)
    acc_pruned = training.evaluate(pruned, test_loader)
    training.finetune(pruned, train_loader, steps=cfg["finetune_steps"], progress=True)
    acc_tuned = training.evaluate(pruned, test_loader)

    print("4/4 measure latency (batch 1) and throughput (batch 64), dense and pruned in alternation")
    lat = interleaved({"dense": model, "pruned": pruned}, example)
    thr = interleaved({"dense": model, "pruned": pruned}, torch.zeros(64, 1, 32, 32), rounds=3, reps=3)
    result = {
        "model": "resnet20 (Fashion-MNIST, 32x32)",
        "importance": "oba_group", "scored_with": rep.scored_with, "steps": cfg["steps"],
        "accuracy_dense": acc_dense, "accuracy_pruned_recalibrated": acc_pruned, "accuracy_finetuned": acc_tuned,
        "params_dense": rep.params_before, "params_pruned": rep.params_after,
        "macs_dense": rep.macs_before, "macs_pruned": rep.macs_after, "macs_ratio": rep.macs_ratio,
        "latency_ms_dense": lat["dense"] * 1e3, "latency_ms_pruned": lat["pruned"] * 1e3,
        "throughput_dense": 64 / thr["dense"], "throughput_pruned": 64 / thr["pruned"],
        "prune_seconds": prune_seconds, "masked_error": rep.masked_error, "quick": bool(getattr(args, "quick", False)),
    }
    print(_table(result))
    (out / "demo.json").write_text(json.dumps(result, indent=1))
    _write_artifacts(model, example, pruned, rep, out)
    print(f"wrote {out}/demo.json, dumps and the pruned module")
    return 0


def _dense_model(cfg: dict) -> torch.nn.Module:
    """The committed ResNet-20 (benchmarks/models, see obafx.bench.dense); a quick run, or a checkout without the
    file, trains one instead (cached under benchmarks/cache)."""
    if cfg["epochs"] is None and dense.available("resnet20"):
        print(f"1/4 load the trained ResNet-20 ({dense.models_dir()}/resnet20.safetensors)")
        return dense.load("resnet20")
    print("1/4 train or load ResNet-20 on Fashion-MNIST (cached under benchmarks/cache)")
    return training.trained("resnet20", epochs=cfg["epochs"],
                            data_kw={"train_limit": cfg["train_limit"]} if cfg["train_limit"] else None)


def _write_artifacts(model, example, pruned, rep, out: Path) -> None:
    from obafx.dump import inspect_model, write_dumps

    write_dumps(inspect_model(model, example), out / "dumps", rep, svg=False)
    try:
        from obafx.io import save
    except ImportError:
        return
    save(pruned, out / "pruned")


def _table(r: dict) -> str:
    rows = [("", "dense", "OBA-pruned", "ratio"),
            ("test accuracy", f"{r['accuracy_dense']:.4f}",
             f"{r['accuracy_finetuned']:.4f} (before fine-tune {r['accuracy_pruned_recalibrated']:.4f})", ""),
            ("params", f"{r['params_dense']:,}", f"{r['params_pruned']:,}", f"{r['params_pruned'] / r['params_dense']:.3f}"),
            ("MACs (thop)", f"{r['macs_dense']:,.0f}", f"{r['macs_pruned']:,.0f}", f"{r['macs_ratio']:.3f}"),
            ("latency b=1 (ms)", f"{r['latency_ms_dense']:.2f}", f"{r['latency_ms_pruned']:.2f}",
             f"{r['latency_ms_dense'] / r['latency_ms_pruned']:.2f}x faster"),
            ("throughput b=64 (img/s)", f"{r['throughput_dense']:.0f}", f"{r['throughput_pruned']:.0f}",
             f"{r['throughput_pruned'] / r['throughput_dense']:.2f}x")]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)
