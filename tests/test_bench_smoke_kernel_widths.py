"""Smoke test: benchmarks/kernel_widths.py times conv and BatchNorm forward+backward at every channel count of its
sweep in both memory formats, and its cost-per-work column follows from the medians stored beside it."""
import json
import math
import statistics

import pytest

from tests.bench_scripts import load_benchmark


def test_tiny_sweep_rows_are_consistent(tmp_path):
    script = load_benchmark("kernel_widths")
    out = tmp_path / "kernel_widths.json"
    returned = script.main(["--batch", "2", "--rounds", "2", "--reps", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))
    per_shape = sum(len(c) for c in script.SHAPES.values())
    assert len(report["rows"]) == 2 * 2 * per_shape
    for r in report["rows"]:
        assert len(r["rounds_ms"]) == 2 and math.isclose(r["ms"], statistics.median(r["rounds_ms"]))
        same = [s for s in report["rows"] if (s["op"], s["format"], s["side"]) == (r["op"], r["format"], r["side"])]
        widest = max(same, key=lambda s: s["channels"])
        work = (lambda c: c * c) if r["op"] == "conv3x3" else (lambda c: c)
        per_work = r["ms"] / work(r["channels"])
        assert math.isclose(r["cost_per_work"], per_work / (widest["ms"] / work(widest["channels"])))


def test_rejects_zero_rounds():
    with pytest.raises(SystemExit):
        load_benchmark("kernel_widths").main(["--rounds", "0"])
