"""Smoke tests: benchmarks/zoo.py and benchmarks/analysis_speed.py run end to end in their --quick settings and
write the promised JSON (schemas checked field by field, values checked for sense)."""
import importlib.util
import json
import os
import sys

import pytest

BENCH = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))


def load(name):
    sys.path.insert(0, BENCH)  # the scripts import their sibling common.py
    spec = importlib.util.spec_from_file_location(f"{name}_bench", os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MACHINE_KEYS = {"python", "torch", "torchvision", "torch_pruning", "cpu_count", "torch_threads", "device"}


def test_zoo_quick_run_writes_the_json_schema(tmp_path):
    out = tmp_path / "zoo.json"
    # one tiny model keeps this a smoke test; --quick alone runs QUICK_MODELS
    returned = load("zoo").main(["--quick", "--models", "squeezenet1_1", "--jobs", "2", "--timeout", "300",
                                 "--out", str(out)])
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))
    assert MACHINE_KEYS <= report["machine"].keys()
    assert report["settings"]["quick"] is True and report["settings"]["tools"] == ["obafx", "torch_pruning"]
    entry = report["models"]["squeezenet1_1"]
    ours, theirs = entry["obafx"], entry["torch_pruning"]
    for e in (ours, theirs):
        assert e["status"] in ("pass", "fail", "error") and isinstance(e["why"], str) and e["wall_s"] > 0
    assert ours["status"] == "pass", ours["why"]
    assert ours["input"] == [1, 3, 32, 32] and ours["dtype"] == "float64"
    assert abs(ours["macs_ratio"] - 0.5) <= 0.01 and 0 < ours["params_ratio"] < 1
    assert ours["oracle"] == "exact" and ours["masked_error"] < 1e-9
    assert ours["keep_all_identical"] and ours["retrace_ok"] and ours["jit_ok"]
    assert set(ours["times_s"]) == {"prune", "checks"}
    assert theirs["status"] == "pass", theirs["why"]
    assert theirs["macs_ratio_tp"] <= 0.51 and theirs["masked"]["ok"] is True
    summary = report["summary"]
    assert summary["obafx"]["pass"] == 1 and summary["torch_pruning"]["pass"] == 1
    assert summary["torch_pruning"]["masked_agree"] == 1


def test_zoo_records_errors_and_timeouts_instead_of_stopping():
    zoo = load("zoo")
    entry = zoo.worker("no_such_model", "obafx", quick=True)  # in-process: what a subprocess would write
    assert entry["status"] == "error" and "no_such_model" in entry["why"] and entry["where"]
    from common import run_isolated
    hung = run_isolated([sys.executable, "-c", "import time; time.sleep(30)"], timeout=1)
    assert hung["status"] == "error" and "timeout" in hung["why"]
    crashed = run_isolated([sys.executable, "-c", "import sys; sys.exit(3)"], timeout=30)
    assert crashed["status"] == "error" and "exited with 3" in crashed["why"]


def test_analysis_speed_quick_run_writes_the_json_schema(tmp_path):
    out = tmp_path / "analysis_speed.json"
    returned = load("analysis_speed").main(["--quick", "--reps", "1", "--models", "resnet18,resnet18@40",
                                            "--out", str(out)])
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))
    assert MACHINE_KEYS <= report["machine"].keys()
    assert report["settings"]["reps"] == 1 and report["settings"]["quick"] is True
    entry = report["models"]["resnet18"]
    assert entry["input"] == [1, 3, 32, 32]
    for tool in ("obafx", "torch_pruning"):
        assert entry[tool]["median_s"] > 0 and len(entry[tool]["times_s"]) == 1 and entry[tool]["groups"] > 0
    assert set(entry["obafx"]["stages_median_s"]) == set(entry["obafx"]["stages_cpu_median_s"]) == {
        "trace", "analyze", "couple"}
    assert report["settings"]["models_left_out"] == ["mobilenet_v3_small"]  # QUICK_MODELS not in --models
    assert report["machine"]["load_avg_1m_end"] is not None and 0 < entry["fx_trace_alone_cpu_median_s"]
    assert 0 < entry["fx_trace_alone_median_s"] < entry["obafx"]["median_s"]  # obafx's trace includes fx's
    assert entry["ratio_obafx_over_tp"] == pytest.approx(entry["obafx"]["median_s"] / entry["torch_pruning"]["median_s"])
    assert report["models"]["resnet18@40"]["input"] == [1, 3, 40, 40]  # the same model at a second input size
    assert report["all_meet_target"] == all(e["meets_target"] for e in report["models"].values())


def test_zoo_update_reruns_some_models_and_keeps_the_rest(tmp_path):
    zoo = load("zoo")
    out = tmp_path / "zoo.json"
    kept = {"obafx": {"status": "pass", "why": ""}}
    out.write_text(json.dumps({"machine": {}, "models": {"kept_model": kept}, "summary": {},
                               "settings": {"timeout_s": 1.0}}))
    report = zoo.main(["--models", "no_such_model", "--tools", "obafx", "--timeout", "120", "--update",
                       "--out", str(out)])
    assert report["models"]["kept_model"] == kept
    assert report["models"]["no_such_model"]["obafx"]["status"] == "error"
    assert report["settings"]["reruns"][0]["models"] == ["no_such_model"]
    assert report["summary"]["obafx"]["pass"] == 1 and report["summary"]["obafx"]["error"] == 1
