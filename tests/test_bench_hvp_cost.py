"""Smoke test: benchmarks/hvp_cost.py runs end to end in its --quick setting and writes the promised JSON."""
import json

import pytest
from tests.bench_scripts import load_benchmark



def load_script():
    return load_benchmark('hvp_cost')


def test_quick_run_writes_the_json_schema(tmp_path):
    out = tmp_path / "hvp_cost.json"
    returned = load_script().main(["--quick", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))
    assert {"torch", "cpu_count", "device"} <= report["machine"].keys()
    assert report["settings"]["quick"] is True and report["settings"]["batch"] == 4
    assert report["settings"]["model_source"] in ("obafx.models", "local")
    assert set(report["models"]) == {"resnet56", "vit"}
    for entry in report["models"].values():
        assert set(entry["ops"]) == {"gradient", "full", "residual", "group_full", "group_residual"}
        for op in entry["ops"].values():
            assert op["time_s"] > 0 and op["cpu_s"] >= 0 and len(op["times_s"]) == 1
            assert isinstance(op["peak_mem_mib"], float) and op["params"] > 0
        assert set(entry["ratios"]) == {f"{op}_{k}" for op in ("full", "residual", "group_full_vs_full",
                                                               "group_residual_vs_residual")
                                        for k in ("time", "cpu", "mem")}
        assert all(v > 0 for k, v in entry["ratios"].items() if k.endswith("time"))
        assert set(entry["meets_targets"]) == set(entry["ratios"])


def test_rejects_unknown_arguments():
    with pytest.raises(SystemExit):
        load_script().main(["--no-such-flag"])
