"""Do the criteria price a unit like its true loss change? Unit scores against single-unit removal, per MAC.

On the committed dense model, every criterion scores every prunable unit (raw, normalizer=None, on the accuracy
benchmark's first calibration set: 8 batches of 64, BatchNorm on batch statistics), and every unit is removed
alone (every slice it owns zeroed: a layer's rows and bias, the next layers' columns, a norm's weight and bias,
which is what removing the channel does) to measure the true loss change on the same batches, in the same mode.
Per criterion: the Spearman correlation of score per MAC saved with true loss change per MAC saved, over all
units, over the residual-stream units (groups with at least twice the median number of members: read and
written by many layers) and over the rest; and the ratio of the stream units' median score per MAC to the other
units' median, next to the same ratio of the true loss change. That ratio is what decides how a per-MAC ranking
splits a MAC budget between streams and the rest.

    python3 benchmarks/score_truth.py                      # resnet20 -> results/score_truth.json
    python3 benchmarks/score_truth.py --models resnet20,vgg_bn,vit_tiny
"""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_json  # noqa: E402
from score_noise import DATA_SET, calibration_parser, spearman  # noqa: E402

from obafx.bench import data as fmnist  # noqa: E402
from obafx.bench import dense  # noqa: E402
from obafx.passes.channel_graph import analyze  # noqa: E402
from obafx.passes.coupling import couple  # noqa: E402
from obafx.passes.facts import ScoreContext  # noqa: E402
from obafx.passes.importance import REGISTRY  # noqa: E402
from obafx.passes.macs import thop_macs  # noqa: E402
from obafx.passes.ranking import mac_savings  # noqa: E402
from obafx.passes.trace import trace  # noqa: E402

# name -> (importance, ScoreContext options); all in train mode, the mode the truth is measured in
CRITERIA = {
    "oba member (default)": ("oba", dict(mode="residual", train=True, unit_sum="member")),
    "oba abs": ("oba", dict(mode="residual", train=True, unit_sum="abs")),
    "taylor abs (Torch-Pruning's rule)": ("taylor", dict(train=True, unit_sum="abs")),
    "taylor member": ("taylor", dict(train=True, unit_sum="member")),
    "oba group, full H, 4 probes": ("oba_group", dict(mode="full", train=True, probes=4)),
    "oba group, full H, 1 probe": ("oba_group", dict(mode="full", train=True, probes=1)),
}
EXAMPLE = torch.zeros(1, 1, 32, 32)


def unit_slices(gm, coupling) -> Dict[int, list]:
    """Unit -> [(parameter, dim, indices)]: every slice that removing the unit zeroes."""
    params = dict(gm.named_parameters())
    out: Dict[int, list] = {}
    for (name, dim), units in coupling.slot_units.items():
        if name in params:
            units = np.asarray(units)
            for u in np.unique(units):
                out.setdefault(int(u), []).append((params[name], dim, torch.as_tensor(np.nonzero(units == u)[0])))
    return out


def stream_groups(coupling) -> list:
    """The residual streams: groups with at least twice the median number of members (read by many layers)."""
    members = np.array([len(g.members) for g in coupling.groups])
    return [g for g, m in zip(coupling.groups, members) if m >= 2 * np.median(members)]


STEP0 = ("committed dense models; {batches}x{size} calibration images (the accuracy benchmark's step-0 set, seed "
         "0); train mode (BatchNorm on batch statistics)")


def write_study(name: str, argv, args, protocol: str, measure) -> int:
    """results JSON of a unit study: command, data set, protocol, machine, and ``measure(model, batches, size)``
    per model of ``args.models``."""
    write_json(args.out, {
        "command": f"python3 benchmarks/{name}.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "data_set": DATA_SET, "protocol": STEP0.format(batches=args.batches, size=args.size) + "; " + protocol,
        "machine": machine_info(),
        "models": {m: measure(m, args.batches, args.size) for m in args.models.split(",")}})
    return 0


def train_loss(gm, batches) -> float:
    """Mean cross-entropy over ``batches`` in train mode (BatchNorm on batch statistics), no gradients; the
    running statistics it moves are restored by the caller."""
    gm.train()
    with torch.no_grad():
        return float(np.mean([F.cross_entropy(gm(x), y).item() for x, y in batches]))


def zero_units(units, slices: Dict[int, list]) -> None:
    """Zero every slice of ``units`` in place (what removing them does); the caller restores the model."""
    for u in units:
        for p, dim, idx in slices.get(u, []):
            p.data.index_fill_(dim, idx, 0.0)


def true_changes(gm, units: List[int], slices: Dict[int, list], batches, base: Optional[float] = None) -> np.ndarray:
    """Loss change of removing each unit alone (its slices zeroed), the model restored after each. ``base``: the
    intact model's `train_loss` on ``batches`` when the caller has it (None: measured here)."""
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    if base is None:
        base = train_loss(gm, batches)
        gm.load_state_dict(state)
    out = []
    for u in units:
        zero_units([u], slices)
        out.append(train_loss(gm, batches) - base)
        gm.load_state_dict(state)
    return np.array(out)


def measure(name: str, n_batches: int, size: int) -> Dict:
    """One model: per criterion, rank agreement with the truth per MAC and the stream-to-rest price ratio."""
    traced = trace(dense.load(name), EXAMPLE)
    gm = traced.gm
    coupling = couple(analyze(traced))
    units = [u for g in coupling.groups for u in g.units]
    streams = stream_groups(coupling)
    in_stream = np.isin(units, [u for g in streams for u in g.units])
    cost = mac_savings(coupling, thop_macs(gm, traced.inputs)[1])
    cost = np.array([cost.get(u, 0.0) for u in units])
    keep = cost > 0
    batches = fmnist.calibration_batches(fmnist.fashion_mnist("train"), n_batches, size, seed=0, step=0)
    start = time.process_time()
    truth = true_changes(gm, units, unit_slices(gm, coupling), batches) / np.where(keep, cost, 1.0)
    row = {"units": len(units), "stream_groups": [g.id for g in streams], "stream_units": int(in_stream.sum()),
           "truth_cpu_seconds": round(time.process_time() - start, 1),
           "truth_negative_fraction": round(float(np.mean(truth[keep] < 0)), 3),
           "truth_stream_to_rest": _ratio(truth, in_stream, keep), "criteria": {}}
    for label, (importance, options) in CRITERIA.items():
        scores = REGISTRY[importance].units(gm, coupling, ScoreContext(batches, normalizer=None, **options))
        est = np.array([scores[u] for u in units]) / np.where(keep, cost, 1.0)
        row["criteria"][label] = {
            "spearman_all": _agree(est, truth, keep), "spearman_streams": _agree(est, truth, keep & in_stream),
            "spearman_rest": _agree(est, truth, keep & ~in_stream), "stream_to_rest": _ratio(est, in_stream, keep)}
        print(name, label, row["criteria"][label], flush=True)
    return row


def _agree(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    return round(spearman(a[where], b[where]), 3) if where.sum() > 2 else float("nan")


def _ratio(per_mac: np.ndarray, in_stream: np.ndarray, keep: np.ndarray) -> float:
    """Median over stream units / median over the other units (both per MAC saved)."""
    if not (keep & in_stream).any() or not (keep & ~in_stream).any():
        return float("nan")  # no streams (a plain chain such as VGG)
    rest = np.median(per_mac[keep & ~in_stream])
    return round(float(np.median(per_mac[keep & in_stream]) / rest), 3) if rest != 0 else float("nan")


def main(argv=None) -> int:
    p = calibration_parser("score_truth", __doc__.splitlines()[0],
                           "calibration batches (the accuracy benchmark's per step)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    return write_study("score_truth", argv, args,
                       "for scores and truth; truth = loss change of zeroing every slice of one unit; per MAC = "
                       "divided by the MACs removing that unit alone saves; streams = groups with at least twice the "
                       "median number of members", measure)

if __name__ == "__main__":
    sys.exit(main())
