"""Allocation or selection? Random channels at the per-layer widths another pruning run chose, then fine-tuned.

    python3 benchmarks/random_at_widths.py --model resnet20 --factor 2 \
        --sources oba_group_ucb2,taylor_abs_train --seeds 0,1,2 --out benchmarks/results/random_at_widths.json

A pruning criterion decides how many units each layer keeps (allocation) and which ones (selection). This takes
the widths each source row of benchmarks/results/accuracy.json kept (same model, budget and seed), keeps a random
set of that many units in every coupled group of the committed dense model (numpy seed 100 + seed), rewrites it
(a physically smaller model with exactly those widths), recalibrates BatchNorm (the accuracy benchmark's 20
batches of 128) and fine-tunes it with the accuracy benchmark's recipe (1 epoch, seeded as its rows). If one
source's allocation fine-tunes better with random channels, the allocation explains a fine-tuned gap between the
sources; if not, the channels each criterion chose do.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine_info, obafx_commit, write_json  # noqa: E402

import acc_protocol as proto  # noqa: E402
from obafx.bench import data as fmnist  # noqa: E402
from obafx.bench import dense  # noqa: E402
from obafx.bench import train as training  # noqa: E402
from obafx.passes.channel_graph import analyze  # noqa: E402
from obafx.passes.coupling import couple  # noqa: E402
from obafx.passes.rewrite import rewrite  # noqa: E402
from obafx.passes.trace import trace  # noqa: E402


def group_layers(traced, coupling, shapes) -> Dict[str, List[str]]:
    """Group id -> the layers whose output width its units set (found by removing one unit and comparing)."""
    dense_widths = proto.widths(traced.gm)
    layers = {}
    for g in coupling.groups:
        after = proto.widths(rewrite(traced, coupling, shapes, {g.units[0]}))
        layers[g.id] = [n for n in dense_widths if after.get(n) != dense_widths[n]]
    return layers


def random_at(traced, coupling, shapes, layers: Dict[str, List[str]], target: Dict[str, int], seed: int):
    """The dense model with a random ``target[layer]`` units kept in every group (numpy seed 100 + ``seed``)."""
    rng = np.random.default_rng(100 + seed)
    removed = set()
    for g in coupling.groups:
        if layers[g.id]:  # a group's width is its layers' output width
            removed.update(rng.choice(g.units, size=g.width - target[layers[g.id][0]], replace=False).tolist())
    return rewrite(traced, coupling, shapes, removed)


def run(model_name: str, factor: float, sources: List[str], seeds: List[int], finetune: Dict[str, Any],
        accuracy_json: Path, test_limit=None) -> List[Dict[str, Any]]:
    rows_in = json.loads(accuracy_json.read_text())["rows"]
    traced = trace(dense.load(model_name).eval(), proto.EXAMPLE)
    facts = analyze(traced)
    coupling = couple(facts)
    layers = group_layers(traced, coupling, facts.shapes)
    train_loader, test_loader = fmnist.loaders(batch_size=128, test_limit=test_limit)
    rows = []
    for source in sources:
        for seed in seeds:
            src = next(r for r in rows_in if r["model"] == model_name and r["method"] == source
                       and r.get("factor") == factor and r.get("seed") == seed)
            pruned = random_at(traced, coupling, facts.shapes, layers, src["widths"], seed)
            recal = proto.recal_batches(train_loader.dataset, {"recal_batches": 20, "recal_size": 128}, seed)
            training.recalibrate_bn(pruned, recal, n_batches=len(recal))
            row = {"model": model_name, "factor": factor, "widths_of": source, "seed": seed,
                   "widths": proto.widths(pruned), "params": sum(p.numel() for p in pruned.parameters()),
                   "acc_pruned": training.evaluate(pruned, test_loader),
                   "source_acc_pruned": src.get("acc_pruned"), "source_acc_finetuned": src.get("acc_finetuned")}
            rows.append(proto.finetune_row(row, pruned, train_loader.dataset, test_loader, finetune))
            print(json.dumps({k: v for k, v in row.items() if k != "widths"}), flush=True)
    return rows


def summary(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per source: mean and std over seeds of random channels' accuracy, beside the source's own."""
    out = []
    for source in dict.fromkeys(r["widths_of"] for r in rows):
        mine = [r for r in rows if r["widths_of"] == source]
        entry = {"widths_of": source, "n": len(mine)}
        for key in ("acc_pruned", "acc_finetuned", "source_acc_pruned", "source_acc_finetuned", "params"):
            values = [r[key] for r in mine if r.get(key) is not None]
            if values:
                entry[key] = statistics.fmean(values)
                entry[key + "_std"] = statistics.pstdev(values)
        out.append(entry)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--factor", type=float, default=2.0)
    p.add_argument("--sources", default="oba_group_ucb2,taylor_abs_train")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 fine-tuning steps, 500 test images")
    p.add_argument("--accuracy-json", default=str(HERE / "results" / "accuracy.json"))
    p.add_argument("--out", default=str(HERE / "results" / "random_at_widths.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    finetune = ({"finetune_epochs": None, "finetune_steps": 2, "eval_batches": None} if args.quick else
                {"finetune_epochs": 1, "finetune_steps": None, "eval_batches": None})
    rows = run(args.model, args.factor, args.sources.split(","), [int(s) for s in args.seeds.split(",")], finetune,
               Path(args.accuracy_json), test_limit=500 if args.quick else None)
    given = sys.argv[1:] if argv is None else argv
    write_json(args.out, {"command": "python3 benchmarks/random_at_widths.py " + " ".join(given),
                          "data_set": "Fashion-MNIST (60k train / 10k test, 28x28 zero-padded to 32x32)",
                          "protocol": __doc__.split("\n\n", 2)[2].strip(), "obafx_commit": obafx_commit(),
                          "machine": {**machine_info(), "threads": args.threads}, "quick": args.quick,
                          "rows": rows, "summary": summary(rows)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
