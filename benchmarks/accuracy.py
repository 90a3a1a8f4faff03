"""The pruning table on real data: accuracy vs MACs for OBA's variants and the baselines, on Fashion-MNIST models.

    python3 benchmarks/accuracy.py --models resnet20 --methods oba_residual,magnitude --seeds 0 --out /tmp/a.json
    python3 benchmarks/accuracy.py --finetune-best /tmp/a.json --out /tmp/ft.json   # fine-tune the best rows
    python3 benchmarks/accuracy.py --merge /tmp/a.json,/tmp/ft.json --out benchmarks/results/accuracy.json
    python3 benchmarks/accuracy.py --quick --out /tmp/q.json     # smoke run (a minute)

Protocol, the same for every method (acc_protocol.py): the committed dense model (benchmarks/models, see
obafx.bench.dense), pruned on the exponential MAC schedule with ``--steps-per-halving`` steps per halving of the
MACs (20: 2x after 20 steps, 3x after 32, 4x after 40), ``--calib-batches`` fresh batches of ``--calib-size``
training images scored before every step, BatchNorm recalibrated (and LayerNorms that lost channels refit)
between steps by obafx, and BatchNorm again after pruning
(``--recal-batches`` batches of 128, no gradients). Column 1, ``acc_pruned``: test accuracy (whole 10k test set)
after that recalibration, without fine-tuning. Column 2, ``acc_finetuned``: after ``--finetune-epochs`` epochs of
the same fine-tune for every method (SGD 0.01 or AdamW 1e-4, cosine, crop+flip), for every row (``--finetune all``)
or, when that does not fit, for the best row of each family per (model, budget) (``--finetune-best``; the JSON says
which). Seeds change the calibration batches, random scores and the fine-tune's data order, not the dense model.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, obafx_commit, write_json  # noqa: E402

import acc_protocol as proto  # noqa: E402
import acc_results as res  # noqa: E402
import acc_tp  # noqa: E402
from obafx.bench import data as fmnist  # noqa: E402
from obafx.bench import dense as dense_models  # noqa: E402
from obafx.bench import train as training  # noqa: E402
from obafx.passes.macs import param_count, thop_macs  # noqa: E402

DEFAULT_METHODS = ("oba_group_ucb2,oba_default,oba_residual,oba_full,oba_residual_train,oba_residual_permac,"
                   "oba_residual_permac_abs,oba_residual_permac_member,oba_residual_permac_member_train,magnitude,"
                   "taylor,taylor_train,taylor_abs,taylor_abs_train,random,tp_taylor,tp_hessian")
DATA_SET = "Fashion-MNIST (60k train / 10k test, 28x28 zero-padded to 32x32, normalised)"
WIDTHS_FACTOR = 3.0  # the budget whose per-layer widths are plotted, one plot per seed
WIDTHS_FACTOR_SEED0 = 2.0  # a second budget, seed 0 only (the fine-tuned cell the default OBA loses is here)


def config(args) -> Dict[str, Any]:
    """The run's settings; --quick shrinks everything to a smoke run."""
    if args.quick:
        return dict(models=["resnet20"], methods=["oba_residual", "magnitude", "tp_taylor"], factors=[2.0],
                    seeds=[0], steps_per_halving=2, calib_batches=1, calib_size=16, recal_batches=2, recal_size=64,
                    finetune="all", finetune_epochs=None, finetune_steps=2, eval_batches=1, train_limit=2000,
                    test_limit=500)
    return dict(models=args.models.split(","), methods=args.methods.split(","),
                factors=sorted(float(f) for f in args.factors.split(",")),
                seeds=[int(s) for s in args.seeds.split(",")], steps_per_halving=args.steps_per_halving,
                calib_batches=args.calib_batches, calib_size=args.calib_size, recal_batches=args.recal_batches,
                recal_size=128, finetune=args.finetune, finetune_epochs=args.finetune_epochs, finetune_steps=None,
                eval_batches=None, train_limit=None, test_limit=None)


def protocol_text(cfg: Dict[str, Any]) -> str:
    steps = proto.segment_steps(cfg["factors"], cfg["steps_per_halving"])
    ft = (f"{cfg['finetune_steps']} steps" if cfg["finetune_steps"] else f"{cfg['finetune_epochs']:g} epoch(s)")
    return (f"exponential MAC schedule, {cfg['steps_per_halving']} steps per halving (cumulative steps to "
            f"{', '.join(f'{f:g}x' for f in cfg['factors'])}: {', '.join(str(sum(steps[:i + 1])) for i in range(len(steps)))}); "
            f"{cfg['calib_batches']} calibration batches of {cfg['calib_size']} per step (fresh each step); BatchNorm "
            f"recalibrated between steps (obafx, which also refits LayerNorms that lost channels; Torch-Pruning "
            f"rows: on the step's batches) and after pruning "
            f"({cfg['recal_batches']} batches of {cfg['recal_size']}); acc_pruned = after that recalibration, no "
            f"fine-tune; acc_finetuned = after {ft} of the same fine-tune (SGD lr 0.01 wd 1e-4 / AdamW 1e-4, cosine, "
            f"crop+flip) for every method; accuracy on the whole test set")


def load_dense(name: str, cfg: Dict[str, Any], quick: bool):
    """The committed dense model; a quick run without committed files trains a tiny one in ./benchmarks/cache."""
    if dense_models.available(name) or not quick:
        return dense_models.load(name), f"benchmarks/models/{name}.safetensors"
    return (training.trained(name, epochs=0.02, data_kw={"train_limit": cfg["train_limit"]}, progress=False),
            "quick: trained for 0.02 epochs")


def dense_row(name: str, model, source: str, test_loader, cfg) -> Dict[str, Any]:
    return {"model": name, "method": "dense", "source": source, "widths": proto.widths(model),
            "macs": thop_macs(model, (proto.EXAMPLE,))[0], "params": param_count(model),
            "acc_dense": training.evaluate(model, test_loader, limit_batches=cfg["eval_batches"])}


def run(args, cfg: Dict[str, Any], out: Path) -> int:
    """Every (model, method, seed) trajectory of the config; the JSON is rewritten after every one."""
    train_loader, test_loader = fmnist.loaders(batch_size=128, train_limit=cfg["train_limit"],
                                               test_limit=cfg["test_limit"])
    data = (train_loader.dataset, test_loader)
    snapshots = Path(args.snapshots) if args.snapshots else Path(tempfile.mkdtemp(prefix="obafx-acc-"))
    rows: List[Dict[str, Any]] = []
    for name in cfg["models"]:
        model, source = load_dense(name, cfg, args.quick)
        rows.append(dense_row(name, model, source, test_loader, cfg))
        for seed in cfg["seeds"]:
            for method in cfg["methods"]:
                try:
                    rows += proto.run_method(name, model, method, seed, cfg, data, snapshots)
                except Exception as exc:  # one failing method must not lose the others' results
                    rows.append({"model": name, "method": method, "factor": 0.0, "seed": seed,
                                 "error": f"{type(exc).__name__}: {exc}"[:500]})
                print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("widths", "groups")}), flush=True)
                write(out, cfg, rows)
    write(out, cfg, rows)
    return 0


def finetune_best(args, out: Path) -> int:
    """Fine-tune, per (model, budget), the best method of each family (by mean acc_pruned), the library's default
    OBA (importance="oba_group") and the paper's criterion (importance="oba")."""
    part = json.loads(Path(args.finetune_best).read_text())
    cfg = {**(part["config"][0] if isinstance(part["config"], list) else part["config"]),
           "finetune_epochs": args.finetune_epochs, "finetune_steps": None}
    rows = [r for r in part["rows"] if "error" not in r]
    chosen = res.best_per_family(res.summarise(rows))
    models, factors = args.models.split(","), {float(f) for f in args.factors.split(",")}
    families = None if args.families is None else set(args.families.split(","))
    train_loader, test_loader = fmnist.loaders(batch_size=128)
    done: List[Dict[str, Any]] = []
    for r in rows:
        if r["method"] == "dense" or r["model"] not in models or r["factor"] not in factors:
            continue
        if families is not None and r["family"] not in families:
            continue
        is_default = r["method"] in res.DEFAULT_METHODS + res.PAPER_METHODS
        if (chosen.get((r["model"], r["factor"], r["family"])) != r["method"] and not is_default) \
                or "acc_finetuned" in r:
            continue
        why = ("the library's default OBA" if r["method"] in res.DEFAULT_METHODS else
               "the paper's criterion with the library's defaults" if is_default else
               "best of its family by mean acc_pruned")
        model = torch.load(r["snapshot"], weights_only=False)
        done.append(proto.finetune_row({**r, "finetune_selection": why},
                                       model, train_loader.dataset, test_loader, cfg))
        print(json.dumps({k: v for k, v in done[-1].items() if k not in ("widths", "groups")}), flush=True)
        write(out, cfg, done)
    write(out, cfg, done)
    return 0


def merge(paths: List[str], out: Path, note: str = "", drop: str = "") -> int:
    """Combine per-process files (prune runs, fine-tune runs) into ``out``, its summary and plots.

    ``drop``: comma-separated ``FILE_GLOB:MODEL:METHOD_GLOB`` rules; a row of a part whose file name matches
    FILE_GLOB, of MODEL, with a method matching METHOD_GLOB is left out (rows a later run of changed code
    supersedes: merged field by field, an old fine-tuned accuracy would sit beside a new recalibrated one)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    rules = [tuple(r.split(":")) for r in drop.split(",") if r]
    rows = res.merge_rows([[r for r in part["rows"] if not _dropped(Path(path).name, r, rules)]
                           for path, part in zip(paths, parts)])
    summary = res.summarise(rows)
    configs = [c for p in parts for c in (p["config"] if isinstance(p["config"], list) else [p["config"]])]
    dropping = f" --drop {shlex.quote(drop)}" if drop else ""  # quoted: the globs must reach the script
    write_json(str(out), {"command": f"python3 benchmarks/accuracy.py --merge {','.join(paths)} --out {out}{dropping}",
                          "commands": [c for p in parts for c in (p.get("commands") or [p["command"]])],
                          **_header(configs[0]), "obafx_commits": sorted({p.get("obafx_commit", "unknown") for p in parts}),
                          "config": configs, "machine": parts[0]["machine"], "scope_note": note,
                          "rows": rows, "summary": summary, "verdict": res.verdicts(summary),
                          "verdict_paper_oba": res.verdicts(summary, res.PAPER_METHODS, "oba")})
    _plots(rows, out)
    return 0


def _dropped(file_name: str, row: Dict[str, Any], rules) -> bool:
    return any(fnmatch.fnmatch(file_name, f) and row.get("model") == m and fnmatch.fnmatch(row.get("method", ""), meth)
               for f, m, meth in rules)


def _header(cfg: Dict[str, Any]) -> Dict[str, Any]:
    return {"data_set": DATA_SET, "obafx_commit": obafx_commit(), "protocol": protocol_text(cfg),
            "tp_hessian_note": acc_tp.TP_HESSIAN_NOTE,
            "tp_vit_note": acc_tp.TP_VIT_NOTE,
            "finetune_note": "only rows with acc_finetuned were fine-tuned; their 'finetune_selection' says why"}


def _plots(rows: List[Dict[str, Any]], out: Path) -> None:
    summary = res.summarise(rows)
    if summary:
        res.plot_accuracy(summary, out.with_suffix(".png"))
        dense_widths = {r["model"]: r["widths"] for r in rows if r["method"] == "dense" and "widths" in r}
        for seed in sorted({r["seed"] for r in rows if r.get("factor") == WIDTHS_FACTOR and "widths" in r}):
            suffix = "" if seed == 0 else f"_s{seed}"  # one plot per seed: allocations differ by seed
            res.plot_widths(rows, dense_widths, WIDTHS_FACTOR, seed, out.with_name(f"{out.stem}_widths{suffix}.png"),
                            res.headline_methods(summary, WIDTHS_FACTOR))
        res.plot_widths(rows, dense_widths, WIDTHS_FACTOR_SEED0, 0,
                        out.with_name(f"{out.stem}_widths_{WIDTHS_FACTOR_SEED0:g}x.png"),
                        res.headline_methods(summary, WIDTHS_FACTOR_SEED0))


def write(out: Path, cfg: Dict[str, Any], rows: List[Dict[str, Any]]) -> None:
    summary = res.summarise(rows)
    write_json(str(out), {"command": "python3 benchmarks/accuracy.py " + " ".join(sys.argv[1:]), **_header(cfg),
                          "config": cfg, "machine": machine_info(), "rows": rows, "summary": summary,
                          "verdict": res.verdicts(summary),
                          "verdict_paper_oba": res.verdicts(summary, res.PAPER_METHODS, "oba")})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet20,vgg_bn,vit_tiny")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"from {sorted(proto.METHODS)}")
    p.add_argument("--factors", default="2,3,4", help="MAC reduction factors (one trajectory passes through all)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--steps-per-halving", type=int, default=20)
    p.add_argument("--calib-batches", type=int, default=8, help="calibration batches per step")
    p.add_argument("--calib-size", type=int, default=64, help="images per calibration batch")
    p.add_argument("--recal-batches", type=int, default=20, help="batches of 128 for BatchNorm after pruning")
    p.add_argument("--finetune", choices=("none", "all"), default="none",
                   help="fine-tune every row in the run (all) or leave it to --finetune-best (none)")
    p.add_argument("--finetune-epochs", type=float, default=1.0)
    p.add_argument("--finetune-best", default=None, help="a result file: fine-tune its best row per family")
    p.add_argument("--families", default=None, help="with --finetune-best: only these families (comma-separated)")
    p.add_argument("--snapshots", default="benchmarks/cache/snapshots", help="where pruned models are kept")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 when several jobs share the cores)")
    p.add_argument("--merge", default=None, help="comma-separated result files to combine into --out (runs nothing)")
    p.add_argument("--note", default="", help="with --merge: what the merged grid covers and leaves out")
    p.add_argument("--drop", default="", help="with --merge: FILE_GLOB:MODEL:METHOD_GLOB rules (comma-separated) "
                   "naming superseded rows to leave out")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="benchmarks/results/accuracy.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.merge:
        return merge(args.merge.split(","), out, args.note, args.drop)
    training.set_threads(args.threads)
    if args.finetune_best:
        return finetune_best(args, out)
    cfg = config(args)
    code = run(args, cfg, out)
    _plots(json.loads(out.read_text())["rows"], out)
    return code


if __name__ == "__main__":
    sys.exit(main())
