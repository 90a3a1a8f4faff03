"""Fuzz compile_prune on random valid architectures and count what happens.

Each example (tests/arch_strategy.py `cases()`: architecture, budget, criterion, steps, seed) goes through
tests/test_fuzz.py `check_case`: it is either pruned and verified by every oracle, refused with an obafx error that
says what to do, or failed (an oracle disagreed, another exception, or an unclear refusal).

Usage: python3 benchmarks/fuzz.py [--examples 200] [--seed 0] [--shrink] [--out benchmarks/results/fuzz.json]
Writes JSON: counts (tried, verified, refused by error type, failed by kind, macs budgets met within the
tolerance or missed with a note), a sample of refusal messages, every
failure (kind, detail, case), how often each block kind was tried and verified, and wall time. The file is
rewritten every 25 examples, so a long background run leaves partial counts. ``--shrink`` then asks hypothesis
to minimise one example of each failure kind (added under "minimal").
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

from arch_strategy import cases, describe  # noqa: E402
from common import machine_info  # noqa: E402
from test_fuzz import check_case  # noqa: E402
from obafx.passes.fit import TOLERANCE  # noqa: E402


class Tally:
    """Counts of outcomes, refusal samples and failures; ``to_json`` is what goes to the results file."""

    def __init__(self, examples: int, seed_value: int):
        self.examples, self.seed = examples, seed_value
        self.tried = self.verified = 0
        self.refused = collections.Counter()
        self.failed = collections.Counter()
        self.refusal_samples = collections.defaultdict(list)
        self.failures = []
        self.blocks_tried, self.blocks_verified = collections.Counter(), collections.Counter()
        self.by_importance = collections.defaultdict(collections.Counter)
        self.start = time.time()
        self.minimal = {}
        self.budget = collections.Counter()  # verified macs budgets: "met" within the tolerance, or "noted" misses

    def add(self, case, result) -> None:
        self.tried += 1
        blocks = set(describe(case["spec"]))
        self.blocks_tried.update(blocks)
        self.by_importance[case["importance"]][result["outcome"]] += 1
        if result["outcome"] == "verified":
            self.verified += 1
            if result.get("budget"):
                self.budget[result["budget"]] += 1
            self.blocks_verified.update(blocks)
        elif result["outcome"] == "refused":
            self.refused[result["kind"]] += 1
            samples = self.refusal_samples[result["kind"]]
            first_line = result["detail"].splitlines()[0][:300]
            if len(samples) < 5 and first_line not in samples:
                samples.append(first_line)
        else:
            self.failed[result["kind"]] += 1
            if sum(1 for f in self.failures if f["kind"] == result["kind"]) < 5:
                self.failures.append({"kind": result["kind"], "detail": result["detail"], "case": case})

    def to_json(self) -> dict:
        return {
            "examples_asked": self.examples, "seed": self.seed, "torch": torch.__version__,
            "tried": self.tried, "verified": self.verified, "refused": sum(self.refused.values()),
            "refused_by_type": dict(self.refused), "failed": sum(self.failed.values()),
            "failed_by_kind": dict(self.failed), "refusal_samples": dict(self.refusal_samples),
            "by_importance": {k: dict(v) for k, v in self.by_importance.items()},
            "blocks_tried": dict(self.blocks_tried), "blocks_verified": dict(self.blocks_verified),
            "macs_budgets": {"tolerance": TOLERANCE, "met": self.budget["met"], "missed_with_note": self.budget["noted"]},
            "failures": self.failures, "minimal": self.minimal, "seconds": round(time.time() - self.start, 1),
        }


def write(tally: Tally, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        json.dump({**tally.to_json(), "machine": machine_info()}, f, indent=1, default=str)
    os.replace(tmp, path)


def run(examples: int, seed_value: int, out: str) -> Tally:
    """Generate ``examples`` cases (no shrinking: we want counts) and tally every outcome."""
    tally = Tally(examples, seed_value)

    @seed(seed_value)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(cases())
    def one(case):
        tally.add(case, check_case(case))
        if tally.tried % 25 == 0:
            write(tally, out)
            print(f"{tally.tried} tried: {tally.verified} verified, {sum(tally.refused.values())} refused, "
                  f"{sum(tally.failed.values())} failed ({time.time() - tally.start:.0f}s)", file=sys.stderr)

    one()
    return tally


def shrink(kind: str, seed_value: int, budget: int) -> dict:
    """Let hypothesis minimise an example failing with ``kind``; the last failing call is the minimal one."""
    last = {}

    @seed(seed_value)
    @settings(max_examples=budget, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(cases())
    def failing(case):
        result = check_case(case)
        if result["outcome"] == "failed" and result["kind"] == kind:
            last.update(case=case, detail=result["detail"])
            raise AssertionError(kind)

    try:
        failing()
    except AssertionError:
        pass
    return last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shrink", action="store_true", help="minimise one example of each failure kind")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on tiny models)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "fuzz.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tally = run(args.examples, args.seed, args.out)
    write(tally, args.out)
    if args.shrink:
        for kind in list(tally.failed):
            tally.minimal[kind] = shrink(kind, args.seed, max(args.examples, 200))
            write(tally, args.out)
    summary = {k: v for k, v in tally.to_json().items() if k in ("tried", "verified", "refused_by_type",
                                                                  "failed_by_kind", "seconds")}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
