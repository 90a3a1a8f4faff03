"""Do units' loss changes add up? Removing k units of one group together against the sum of removing each alone.

Every per-unit criterion (OBA's, the group-exact score, Taylor, magnitude) prices a unit as if it were removed
alone and ranks the sum. On the committed dense model, per group (each residual stream: groups with at least twice
the median number of members; and the widest other group), the units are ordered by their true single-removal
loss change (every slice a unit owns zeroed, as in score_truth.py; no criterion involved), and the k cheapest are
removed together for k = 1/24, 1/12, 1/6, 1/4, 1/3 of the group: the joint loss change against the sum of the
singles, and their difference (the interaction: the cross terms no per-unit score sees). An interaction near 0 is a
group whose units' costs add up; a large positive one, a group whose joint removal costs more than any per-unit
score can see. (The ratio joint / sum is given where the sum is positive; the cheapest units' single changes are
often below zero.) ``--groups`` names more groups to measure (shell patterns on group ids, e.g. the ViT's
attention head dims, '*.attn.qkv'); a pattern no group of a model matches is recorded for that model, not an error
(the models differ).

The units are chosen, and their single changes measured, on one set of calibration images; a second set (the
accuracy benchmark's step-0 images of seed 1) measures the same singles and the same joint removals again
("held_out_*"), and each group records the fraction of its single changes below zero on both sets: a unit that
looks free on the images that chose it and costs on others is the selection's luck (a winner's curse), not an
interaction.

    python3 benchmarks/joint_removal.py                   # resnet20,vit_tiny -> results/joint_removal.json
    python3 benchmarks/joint_removal.py --groups '*.attn.qkv'
"""
from __future__ import annotations

import fnmatch
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score_noise import calibration_parser  # noqa: E402
from score_truth import (EXAMPLE, stream_groups, train_loss, true_changes, unit_slices, write_study,  # noqa: E402
                         zero_units)

from obafx.bench import data as fmnist  # noqa: E402
from obafx.bench import dense  # noqa: E402
from obafx.passes.channel_graph import analyze  # noqa: E402
from obafx.passes.coupling import couple  # noqa: E402
from obafx.passes.trace import trace  # noqa: E402

FRACTIONS = (1 / 24, 1 / 12, 1 / 6, 1 / 4, 1 / 3)


def joint_change(gm, units: List[int], slices: Dict[int, list], batches, base: float) -> float:
    """Loss change of zeroing every slice of all ``units`` at once (the model restored after)."""
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    zero_units(units, slices)
    out = train_loss(gm, batches) - base
    gm.load_state_dict(state)
    return out


def group_rows(gm, group, kind: str, slices, batches, base: float, held_out) -> Dict:
    """One group: its k cheapest units (by true single change on ``batches``, whose intact loss is ``base``)
    removed together, per fraction. ``held_out``: (batches, base loss) of a second image set on which the same
    singles and joint removals are measured again (keys held_out_*)."""
    units = list(group.units)
    single = true_changes(gm, units, slices, batches, base)
    other = true_changes(gm, units, slices, *held_out)
    order = np.argsort(single)
    rows = []
    for fraction in FRACTIONS:
        k = max(1, int(round(fraction * len(units))))
        chosen = [units[i] for i in order[:k]]
        joint, summed = joint_change(gm, chosen, slices, batches, base), float(single[order[:k]].sum())
        rows.append({"k": k, "fraction": round(fraction, 4), "sum_of_singles": round(summed, 5),
                     "joint": round(joint, 5), "interaction": round(joint - summed, 5),
                     "ratio": round(joint / summed, 2) if summed > 0 else None,
                     "held_out_sum_of_singles": round(float(other[order[:k]].sum()), 5),
                     "held_out_joint": round(joint_change(gm, chosen, slices, *held_out), 5)})
    return {"group": group.id, "kind": kind, "units": len(units), "members": len(group.members),
            "negative_fraction": round(float((single < 0).mean()), 3),
            "held_out_negative_fraction": round(float((other < 0).mean()), 3), "removals": rows}


def chosen_groups(coupling, patterns: Sequence[str] = ()) -> List[tuple]:
    """(group, kind) to measure: every stream, the widest other group, then every other group whose id matches
    one of ``patterns`` (fnmatch), in the coupling's order."""
    streams = stream_groups(coupling)
    rest = [g for g in coupling.groups if g not in streams]
    chosen = [(g, "stream") for g in streams] + ([(max(rest, key=lambda g: len(g.units)), "widest other")]
                                                 if rest else [])
    taken = {id(g) for g, _ in chosen}
    return chosen + [(g, "named") for g in coupling.groups
                     if id(g) not in taken and any(fnmatch.fnmatchcase(g.id, p) for p in patterns)]


def measure(name: str, n_batches: int, size: int, patterns: Sequence[str] = ()) -> Dict:
    """One model: the joint-vs-summed table of each stream group, of the widest other group and of the groups
    ``patterns`` name (`chosen_groups`)."""
    traced = trace(dense.load(name), EXAMPLE)
    gm = traced.gm
    coupling = couple(analyze(traced))
    chosen = chosen_groups(coupling, patterns)
    train = fmnist.fashion_mnist("train")
    batches = fmnist.calibration_batches(train, n_batches, size, seed=0, step=0)
    held = fmnist.calibration_batches(train, n_batches, size, seed=1, step=0)
    slices = unit_slices(gm, coupling)
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    base, base_held = train_loss(gm, batches), train_loss(gm, held)
    gm.load_state_dict(state)
    start = time.process_time()
    groups = [group_rows(gm, g, kind, slices, batches, base, (held, base_held)) for g, kind in chosen]
    for g in groups:
        print(name, g["kind"], g["group"], [(r["k"], r["sum_of_singles"], r["joint"]) for r in g["removals"]], flush=True)
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(g.id, p) for g in coupling.groups)]
    return {"base_loss": round(base, 5), "held_out_base_loss": round(base_held, 5), "groups": groups,
            "unmatched_patterns": unmatched, "cpu_seconds": round(time.process_time() - start, 1)}


def main(argv=None) -> int:
    p = calibration_parser("joint_removal", __doc__.splitlines()[0],
                           "calibration batches (the accuracy benchmark's per step)")
    p.set_defaults(models="resnet20,vit_tiny")
    p.add_argument("--groups", default="", help="comma-separated shell patterns of more group ids to measure")
    args = p.parse_args(argv)
    patterns = [x for x in args.groups.split(",") if x]
    torch.set_num_threads(args.threads)
    return write_study("joint_removal", argv, args,
                       "a unit's removal = every slice it owns zeroed; per group the k units with the smallest "
                       "single loss change removed together, k = " + ", ".join(f"1/{round(1 / f)}" for f in FRACTIONS)
                       + " of the group's units; ratio = joint loss change / sum of the singles; interaction = "
                       "joint - sum; streams = groups with at least twice the median number of members"
                       + (f"; named = groups matching {patterns}" if patterns else "")
                       + "; held_out_* = the same units measured on the step-0 images of seed 1",
                       lambda name, batches, size: measure(name, batches, size, patterns))

if __name__ == "__main__":
    sys.exit(main())
