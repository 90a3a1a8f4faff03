"""Smoke test: benchmarks/hf_scale.py --tiny (single process) prunes a 2-layer LLaMA built from config with OBA
on random-token batches and writes the promised JSON: protocol, machine, wall time, per-stage seconds, peak RSS,
params and FLOPs before/after, masked_error, torch threads."""
import json

import pytest

from tests.prune_oracles import one_thread
from tests.bench_scripts import load_benchmark

pytest.importorskip("transformers")


def load_script():
    return load_benchmark('hf_scale')


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_scale") / "hf_scale.json"
    with one_thread():
        returned = load_script().main(["--tiny", "--out", str(out)])
    return returned, json.loads(out.read_text())


def test_tiny_run_writes_protocol_machine_and_single_record(tiny):
    returned, report = tiny
    assert report == json.loads(json.dumps(returned))
    proto = report["protocol"]
    assert proto["tiny"] and proto["macs"] == 0.6 and proto["importance"] == "oba"
    assert proto["batch_shape"] == [2, 64] and proto["batches"] == 4 and "random token" in proto["calibration"]
    assert {"torch", "cpu_count", "torch_threads"} <= report["machine"].keys()
    rec = report["single"]
    assert "error" not in rec, rec.get("traceback")
    assert rec["torch_threads"] == 1 and rec["wall_s"] > 0
    assert rec["peak_rss_mb"] >= rec["peak_rss_mb_after_build"] > 0


def test_tiny_run_prunes_to_the_budget_and_matches_the_masked_model(tiny):
    rec = tiny[1]["single"]
    assert rec["params_before"] == rec["params_model"] > rec["params_after"] > 0
    assert 0.5 <= rec["flops_after"] / rec["flops_before"] <= 0.63 and rec["counter"] == "flops"
    assert rec["masked_error"] is not None and rec["masked_error"] < 1e-4
    assert {"trace", "score", "rewrite", "verify"} <= rec["seconds"].keys()
    assert len(rec["plan_sha256"]) == 64 and rec["n_plan_entries"] > 0
