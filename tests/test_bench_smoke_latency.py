"""Smoke test: benchmarks/latency.py --quick runs end to end (with a deterministic injected timer, so no number
depends on this machine's load) and writes the promised JSON: machine, protocol, one cell per request with its
verdict and the numbers the verdict follows from."""
import json

import pytest

from tests.prune_oracles import one_thread
from tests.bench_scripts import load_benchmark



def load_script():
    return load_benchmark('latency')


def params_timer(module, args):
    """One nanosecond per parameter plus a fixed 20 microseconds (a call's overhead)."""
    return 2e-5 + 1e-9 * sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("latency") / "latency.json"
    with one_thread():
        returned = load_script().main(["--quick", "--no-progress", "--out", str(out), "--reduced", "smoke"],
                                      timer=params_timer)
    return returned, json.loads(out.read_text())


def test_quick_run_writes_machine_protocol_and_cells(quick):
    returned, report = quick
    assert report == json.loads(json.dumps(returned))
    assert {"torch", "cpu_count", "threads", "device"} <= report["machine"].keys()
    assert report["protocol"]["threads"] == 1 and report["protocol"]["timer"] == "injected (test)"
    assert report["reduced"] == "smoke" and report["total"] == len(report["cells"]) == 1
    assert report["obafx_commit"]  # a merge carries it into each run's record
    assert "random inputs" in report["data"]
    c = report["cells"][0]
    assert (c["model"], c["batch"], c["mode"], c["requested_speedup"]) == ("vit_tiny", 1, "eager", 1.5)


def test_cell_verdict_follows_from_the_re_measured_speedup(quick):
    c = quick[1]["cells"][0]
    assert c["status"] == "met" and c["why"] is None and quick[1]["met"] == 1
    assert c["speedup"] == pytest.approx(c["check"]["dense_s"] / c["check"]["pruned_s"])
    assert abs(c["speedup"] / 1.5 - 1) <= 0.10 and c["mac_ratio"] > 1 and c["params_ratio"] > 1
    assert c["loop"]["mode"] == "eager" and c["loop"]["batch"] == 1


def test_verdict_names_why_a_cell_misses():
    bench = load_script()
    row = {"speedup": 1.2, "loop_speedup": 2.0, "notes": [], "mac_ratio": 2.1, "batch": 1,
           "check": {"dense_spread_s": [1, 2], "pruned_spread_s": [1, 2]}}
    assert bench.verdict(2.0, row)[1].startswith("noise")
    row["notes"] = ["the latency budget was missed: ..."]
    assert bench.verdict(2.0, row)[1].startswith("noise")  # the loop got within 10%: the re-check is the outlier
    row["loop_speedup"] = 1.7
    assert bench.verdict(2.0, row) == ("missed", row["notes"][0])
    assert bench.verdict(1.25, row) == ("met", None)
    row["mac_ratio"] = 50.0
    assert bench.verdict(2.0, row)[1].startswith("overhead-bound: the result has 50.0x fewer MACs")
    row["loop_speedup"] = 2.0  # the loop met it: however many MACs went, the re-check is the outlier
    assert bench.verdict(2.0, row)[1].startswith("noise")


def test_rejects_a_request_that_is_no_speedup():
    with pytest.raises(SystemExit):
        load_script().main(["--requests", "1.0"])


def test_a_cell_past_its_timeout_is_recorded_and_the_run_goes_on(monkeypatch):
    import time
    from types import SimpleNamespace

    import torch

    bench = load_script()
    monkeypatch.setattr(bench, "cell", lambda *a: time.sleep(5))
    row = bench.timed_cell("vit_tiny", None, torch.zeros(1, 1), "eager", 2.0, SimpleNamespace(cell_timeout=1), None)
    assert row["status"] == "timeout" and "more than 1 s" in row["why"]


def test_merge_keeps_every_run_and_a_later_cell_replaces_the_same_cell(tmp_path):
    """Two runs (batch 1, then the throughput batch with one batch-1 cell re-measured) merge into one report whose
    cells name their run; merging the merged file again changes nothing."""
    bench = load_script()
    cell = lambda batch, req, status: {"model": "vit_tiny", "batch": batch, "mode": "eager",  # noqa: E731
                                       "requested_speedup": req, "status": status, "speedup": req}
    run = lambda cells, why: {"machine": {"m": why}, "protocol": {"timer": "process CPU time", "within": 0.1},  # noqa
                              "settings": {}, "reduced": why, "runtime_s": 1.0, "cells": cells,
                              "obafx_commit": f"sha-{why}"}
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(run([cell(1, 1.5, "met"), cell(1, 2.0, "missed")], "batch 1")))
    second.write_text(json.dumps(run([cell(64, 2.0, "met"), cell(1, 2.0, "met")], "throughput")))
    out = tmp_path / "merged.json"
    merged = bench.main(["--merge", f"{first},{second}", "--out", str(out)])
    assert [(c["batch"], c["requested_speedup"], c["status"], c["run"]) for c in merged["cells"]] == \
        [(1, 1.5, "met", 0), (1, 2.0, "met", 1), (64, 2.0, "met", 1)]
    assert merged["met"] == merged["total"] == 3 and merged["machine"] == {"m": "throughput"}
    assert [r["reduced"] for r in merged["runs"]] == ["batch 1", "throughput"]
    assert [r["obafx_commit"] for r in merged["runs"]] == ["sha-batch 1", "sha-throughput"]
    assert "run 0 (a.json): batch 1" in merged["reduced"] and "run 1 (b.json): throughput" in merged["reduced"]
    again = bench.main(["--merge", str(out), "--out", str(tmp_path / "again.json")])
    assert again == json.loads(out.read_text())


def test_merge_gives_a_measured_cell_its_verdict_by_the_current_rule(tmp_path):
    bench = load_script()
    measured = {"model": "vit_tiny", "batch": 1, "mode": "eager", "requested_speedup": 3.0, "speedup": 2.1,
                "loop_speedup": 3.2, "mac_ratio": 1.5, "notes": ["the latency budget was missed: x"],
                "check": {"dense_spread_s": [0.2, 0.4], "pruned_spread_s": [0.1, 0.12]},
                "status": "missed", "why": "the latency budget was missed: x"}  # as an older rule wrote it
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"machine": {}, "protocol": {}, "settings": {}, "reduced": None, "cells": [measured]}))
    (cell,) = bench.main(["--merge", str(path), "--out", str(tmp_path / "m.json")])["cells"]
    assert cell["status"] == "missed" and cell["why"].startswith("noise: the pruning loop measured 3.20x")
    assert "dense 0.2-0.4 s" in cell["why"]
