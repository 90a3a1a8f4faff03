"""How much of a unit score is calibration noise? Split-sample agreement of the criteria's unit scores.

On the committed dense model, every criterion scores every prunable unit (one channel of a coupled group) on
``--splits`` disjoint calibration sets of the accuracy benchmark's size (8 batches of 64 images, the sets of
pruning steps 0, 1, ...), unnormalised (normalizer=None: a unit's total over all its slices). Reported per
criterion: the mean Spearman rank correlation of the unit scores between every pair of sets (1 = the ranking
does not depend on which images were drawn), and the same for the residual-stream groups alone (the largest
groups: the ones whose allocation decides the accuracy table).

Why: at a converged model the expected gradient is ~0, so a signed per-unit sum such as Taylor's |g_uᵀθ_u| or
OBA's |θ_uᵀ(Mθ)_u| (unit_sum="signed") is a small difference of large terms and moves with the calibration
images, while a sum of per-parameter magnitudes (unit_sum="abs", Torch-Pruning's Taylor rule) does not cancel.

    python3 benchmarks/score_noise.py                       # resnet20, 4 sets -> results/score_noise.json
    python3 benchmarks/score_noise.py --models vgg_bn,vit_tiny --splits 3
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_json  # noqa: E402

from obafx.bench import data as fmnist  # noqa: E402
from obafx.bench import dense  # noqa: E402
from obafx.passes.channel_graph import analyze  # noqa: E402
from obafx.passes.coupling import couple  # noqa: E402
from obafx.passes.facts import ScoreContext  # noqa: E402
from obafx.passes.importance import REGISTRY  # noqa: E402
from obafx.passes.trace import trace  # noqa: E402

# name -> (importance, ScoreContext options)
CRITERIA = {
    "taylor signed": ("taylor", dict(unit_sum="signed")),
    "taylor abs": ("taylor", dict(unit_sum="abs")),
    "oba residual signed": ("oba", dict(mode="residual", unit_sum="signed")),
    "oba residual abs": ("oba", dict(mode="residual", unit_sum="abs")),
    "oba residual train signed": ("oba", dict(mode="residual", train=True, unit_sum="signed")),
    "magnitude": ("magnitude", dict()),
}
EXAMPLE = torch.zeros(1, 1, 32, 32)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties get arbitrary but fixed ranks; scores here are continuous)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def unit_scores(gm, coupling, importance: str, options: Dict, batches) -> np.ndarray:
    """Raw (unnormalised) score of every unit, in the coupling's unit order."""
    ctx = ScoreContext(batches, normalizer=None, **options)
    scores = REGISTRY[importance].units(gm, coupling, ctx)
    return np.array([scores[u] for g in coupling.groups for u in g.units])


def agreement(runs: List[np.ndarray], index: np.ndarray) -> float:
    """Mean pairwise Spearman correlation of ``runs`` restricted to ``index``."""
    return float(np.mean([spearman(a[index], b[index]) for a, b in itertools.combinations(runs, 2)]))


def measure(name: str, splits: int, n_batches: int, size: int) -> Dict:
    """One model: agreement per criterion over all units and over the largest groups (the residual streams)."""
    model = dense.load(name)
    traced = trace(model, EXAMPLE)
    coupling = couple(analyze(traced))
    sizes = [len(g.units) for g in coupling.groups]
    big = np.argsort([len(g.members) for g in coupling.groups], kind="stable")[::-1][:3]
    starts = np.cumsum([0] + sizes)
    all_units = np.arange(starts[-1])
    stream_units = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in big])
    train_set = fmnist.fashion_mnist("train")
    sets = [fmnist.calibration_batches(train_set, n_batches, size, seed=0, step=s) for s in range(splits)]
    rows = {}
    for label, (importance, options) in CRITERIA.items():
        start = time.process_time()
        runs = [unit_scores(traced.gm, coupling, importance, options, b) for b in sets]
        rows[label] = {"all_units": round(agreement(runs, all_units), 4),
                       "stream_units": round(agreement(runs, stream_units), 4),
                       "cpu_seconds": round(time.process_time() - start, 1)}
        print(name, label, rows[label], flush=True)
    return {"units": int(starts[-1]), "stream_groups": [coupling.groups[i].id for i in big],
            "stream_units": int(len(stream_units)), "criteria": rows}


DATA_SET = "Fashion-MNIST train split (28x28 zero-padded to 32x32, normalised)"


def calibration_parser(name: str, description: str, batches_help: str) -> argparse.ArgumentParser:
    """The options every unit-score study on the committed dense models shares (score_noise, score_truth): the
    models, the calibration batches and their size, threads, and the JSON written to results/<name>.json."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--models", default="resnet20")
    p.add_argument("--batches", type=int, default=8, help=batches_help)
    p.add_argument("--size", type=int, default=64, help="images per batch")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / f"{name}.json"))
    return p


def main(argv=None) -> int:
    p = calibration_parser("score_noise", __doc__.splitlines()[0],
                           "batches per set (the accuracy benchmark's per step)")
    p.add_argument("--splits", type=int, default=4, help="disjoint calibration sets")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"command": "python3 benchmarks/score_noise.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "data_set": DATA_SET,
              "protocol": f"{args.splits} disjoint calibration sets of {args.batches}x{args.size} images (the "
                          "accuracy benchmark's sets of steps 0..n-1, seed 0); unit scores unnormalised; mean "
                          "pairwise Spearman correlation over all units and over the 3 groups with most members "
                          "(the residual streams on ResNets); eval mode unless the row says train",
              "machine": machine_info(),
              "models": {m: measure(m, args.splits, args.batches, args.size) for m in args.models.split(",")}}
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
