"""Which criterion picks better channels when every criterion must keep the same number in every group?

    python3 benchmarks/fixed_widths.py --models vgg_bn,resnet20 --keep 0.7,0.5 --seeds 0,1,2 \
        --out benchmarks/results/fixed_widths.json

The accuracy table mixes two things a criterion decides: how many units each group keeps (allocation) and which
ones (selection). This benchmark fixes the allocation (every coupled group keeps the same fraction, rounded down,
at least one unit) so that only the selection differs. Protocol, per (model, keep fraction, seed): the committed
dense model; unit scores of each criterion from one set of 8 calibration batches of 64 training images (the
accuracy benchmark's step-0 set for that seed: one pruning step's data), unnormalised unless the criterion
says (a per-group scale does not change which units of a group are lowest); in every group the
lowest-scored units removed in one shot (obafx's rewrite, a physically smaller model); BatchNorm recalibrated
(the accuracy benchmark's 20 batches of 128); accuracy on the whole test set. No fine-tuning. ``random`` draws
the units with the seed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, Set

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_json  # noqa: E402

import acc_protocol as proto  # noqa: E402
from obafx.bench import data as fmnist  # noqa: E402
from obafx.bench import dense  # noqa: E402
from obafx.bench import train as training  # noqa: E402
from obafx.passes.channel_graph import analyze  # noqa: E402
from obafx.passes.coupling import couple  # noqa: E402
from obafx.passes.facts import ScoreContext  # noqa: E402
from obafx.passes.importance import REGISTRY  # noqa: E402
from obafx.passes.rewrite import rewrite  # noqa: E402
from obafx.passes.trace import trace  # noqa: E402

# name -> (importance, ScoreContext options); None: random
CRITERIA = {
    "random": None,
    "magnitude": ("magnitude", dict()),
    "taylor signed": ("taylor", dict(unit_sum="signed")),
    "taylor abs": ("taylor", dict(unit_sum="abs")),
    "oba residual signed": ("oba", dict(mode="residual", unit_sum="signed")),
    "oba residual abs (default)": ("oba", dict(mode="residual", unit_sum="abs")),
    # |unit sum| on each batch, averaged over the batches: E_b|θ_uᵀ g_u(b)| (Molchanov et al.'s order)
    # the library's reduce under a per-group normaliser: mean over the unit's members of each member's |slice sum|
    "taylor member-abs": ("taylor", dict(unit_sum="signed", normalizer="max")),
    "oba residual member-abs": ("oba", dict(mode="residual", unit_sum="signed", normalizer="max")),
    "taylor batch-abs": ("taylor", dict(unit_sum="signed", per_batch=True)),
    "oba residual batch-abs": ("oba", dict(mode="residual", unit_sum="signed", per_batch=True)),
}


def unit_scores(gm, coupling, criterion, batches, seed: int) -> Dict[int, float]:
    """Raw score of every unit (higher = keep); random scores drawn with ``seed``."""
    if criterion is None:
        rng = np.random.default_rng(seed)
        return {u: float(rng.random()) for g in coupling.groups for u in g.units}
    importance, options = criterion
    options = dict(options)
    if options.pop("per_batch", False):  # the mean over batches of each batch's own |unit sum|
        per_batch = [REGISTRY[importance].units(gm, coupling, ScoreContext([b], **{"normalizer": None, **options}))
                     for b in batches]
        return {u: float(np.mean([s[u] for s in per_batch])) for u in per_batch[0]}
    return REGISTRY[importance].units(gm, coupling, ScoreContext(batches, **{"normalizer": None, **options}))


def lowest_per_group(coupling, scores: Dict[int, float], keep: float) -> Set[int]:
    """The units to remove: in each group the lowest-scored ones beyond floor(width * keep) (at least 1 kept)."""
    removed: Set[int] = set()
    for g in coupling.groups:
        n_keep = max(1, int(g.width * keep))
        ranked = sorted(g.units, key=lambda u: scores[u])
        removed.update(ranked[:g.width - n_keep])
    return removed


def measure(name: str, keeps, seeds, test_loader, train_set) -> list:
    model = dense.load(name).eval()
    traced = trace(model, proto.EXAMPLE)
    facts = analyze(traced)
    coupling = couple(facts)
    rows = []
    for seed in seeds:
        batches = fmnist.calibration_batches(train_set, 8, 64, seed=seed, step=0)
        recal = proto.recal_batches(train_set, {"recal_batches": 20, "recal_size": 128}, seed)
        for label, criterion in CRITERIA.items():
            start = time.process_time()
            scores = unit_scores(traced.gm, coupling, criterion, batches, seed)
            seconds = time.process_time() - start
            for keep in keeps:
                pruned = rewrite(traced, coupling, facts.shapes, lowest_per_group(coupling, scores, keep))
                training.recalibrate_bn(pruned, recal, n_batches=len(recal))
                rows.append({"model": name, "criterion": label, "keep": keep, "seed": seed,
                             "score_cpu_seconds": round(seconds, 1),
                             "widths": proto.widths(pruned), "acc": training.evaluate(pruned, test_loader)})
                print(rows[-1]["model"], label, keep, seed, rows[-1]["acc"], flush=True)
    return rows


def summary(rows) -> list:
    """Mean and std of the accuracy over seeds, per (model, keep, criterion)."""
    keys = sorted({(r["model"], r["keep"], r["criterion"]) for r in rows}, key=str)
    out = []
    for model, keep, criterion in keys:
        accs = [r["acc"] for r in rows if (r["model"], r["keep"], r["criterion"]) == (model, keep, criterion)]
        out.append({"model": model, "keep": keep, "criterion": criterion, "acc": float(np.mean(accs)),
                    "acc_std": float(np.std(accs)), "n": len(accs)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vgg_bn,resnet20")
    p.add_argument("--keep", default="0.7,0.5", help="fraction of every group's units to keep")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--criteria", default=None, help="comma-separated subset of CRITERIA (default: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "fixed_widths.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.criteria:
        global CRITERIA
        CRITERIA = {k: CRITERIA[k] for k in args.criteria.split(",")}
    train_loader, test_loader = fmnist.loaders(batch_size=128)
    keeps = [float(k) for k in args.keep.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = [r for m in args.models.split(",") for r in measure(m, keeps, seeds, test_loader, train_loader.dataset)]
    write_json(args.out, {"command": "python3 benchmarks/fixed_widths.py " + " ".join(sys.argv[1:]),
                          "data_set": "Fashion-MNIST (60k train / 10k test, 28x28 zero-padded to 32x32)",
                          "protocol": __doc__.split("\n\n", 2)[2].strip(), "machine": machine_info(),
                          "rows": rows, "summary": summary(rows)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
