"""Smoke test: benchmarks/throughput.py --quick runs end to end and writes the promised JSON and PNG, with
speed-ups, throughputs and MAC ratios that follow from the medians and counts stored beside them."""
import json
import math
import statistics

import pytest
from tests.bench_scripts import load_benchmark

NUMBER = (int, float)
ROW_NUMBERS = ("budget", "round_to", "batch_throughput", "prune_s", "macs_thop_dense", "macs_thop_pruned",
               "macs_flopcounter_dense", "macs_flopcounter_pruned", "params_dense", "params_pruned",
               "mac_ratio_thop", "mac_ratio_flopcounter", "latency_dense_s", "latency_pruned_s", "throughput_dense",
               "throughput_pruned", "speedup_latency", "speedup_throughput", "speedup_throughput_paired",
               "speedup_latency_over_mac_ratio", "speedup_throughput_over_mac_ratio")


def load_script():
    return load_benchmark('throughput')


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput") / "throughput.json"
    returned = load_script().main(["--quick", "--out", str(out)])
    return out, returned, json.loads(out.read_text())


def test_quick_run_writes_json_and_plot(quick):
    out, returned, report = quick
    assert report == json.loads(json.dumps(returned))
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"torch", "cpu_count", "device_name", "threads"} <= report["machine"].keys()
    assert report["settings"]["quick"] is True and report["settings"]["compile_models"] == []
    assert report["machine"]["threads"] == report["settings"]["threads"] >= 1
    assert report["runtime_s"] > 0 and report["target"]["checks"] == []  # no resnet50 in the quick run


def test_rows_cover_both_budgets_eager_only(quick):
    rows = quick[2]["rows"]
    assert [(r["model"], r["budget_label"], r["mode"]) for r in rows] == [("resnet20", "2x", "eager"),
                                                                          ("resnet20", "3x", "eager")]
    for r in rows:
        assert r["error"] is None and r["device"] in ("cpu", "cuda") and isinstance(r["masked_error"], float)
        for key in ROW_NUMBERS:
            assert isinstance(r[key], NUMBER) and not isinstance(r[key], bool) and r[key] > 0, key


def test_derived_numbers_are_consistent(quick):
    reps = quick[2]["settings"]["reps"]
    for r in quick[2]["rows"]:
        for side in ("dense", "pruned"):
            lat, bat = r[f"latency_rounds_{side}_s"], r[f"batch_rounds_{side}_s"]
            assert len(lat) == len(bat) == reps
            assert math.isclose(r[f"latency_{side}_s"], statistics.median(lat))
            assert math.isclose(r[f"throughput_{side}"], r["batch_throughput"] / statistics.median(bat))
        assert math.isclose(r["speedup_latency"], r["latency_dense_s"] / r["latency_pruned_s"])
        assert math.isclose(r["speedup_throughput"], statistics.median(r["batch_rounds_dense_s"])
                            / statistics.median(r["batch_rounds_pruned_s"]))
        assert math.isclose(r["mac_ratio_thop"], r["macs_thop_dense"] / r["macs_thop_pruned"])
        assert math.isclose(r["speedup_throughput_over_mac_ratio"],
                            r["speedup_throughput"] / r["mac_ratio_flopcounter"])
        # the pruning met its thop budget (1 % tolerance of select) and removed parameters
        assert r["macs_thop_pruned"] <= r["budget"] * r["macs_thop_dense"] * 1.01
        assert r["params_pruned"] < r["params_dense"]


def test_rejects_unknown_model():
    with pytest.raises(SystemExit):
        load_script().main(["--models", "no_such_model"])


def test_update_keeps_the_other_models(quick, tmp_path):
    """--update: a partial rerun replaces its models' rows and keeps the rest of the earlier file, noting the rerun."""
    script, report = load_script(), quick[2]
    earlier = {**report, "rows": [{**report["rows"][0], "model": "other"}, {**report["rows"][0]}],
               "profile": {"other": {"x": 1}, "resnet20": {"old": 1}}}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(earlier))
    merged = script.updated(str(path), {**report, "profile": {}}, ["resnet20"])
    assert [r["model"] for r in merged["rows"]] == ["other"] + [r["model"] for r in report["rows"]]
    assert merged["profile"] == {"other": {"x": 1}} and merged["partial_reruns"][0]["models"] == ["resnet20"]


def test_vit_b_16_asks_for_half_its_flops_too():
    """vit_b_16's variants include a 2x budget by FlopCounterMode (counter="flops"), labelled so in the table."""
    script = load_script()
    flops = [v for v in script.variants("vit_b_16") if v.get("counter") == "flops"]
    assert len(flops) == 1 and flops[0]["budget"] == 0.5 and script.label(flops[0]) == "2x-flops"
    assert all("counter" not in v for v in script.variants("resnet50"))
