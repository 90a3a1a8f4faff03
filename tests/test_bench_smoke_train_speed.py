"""Smoke test: benchmarks/train_speed.py --quick prunes, times dense and pruned SGD steps and inference in both
memory formats, and writes JSON whose speed-ups follow from the medians stored beside them."""
import json
import math
import statistics

import pytest
from tests.bench_scripts import load_benchmark



def load_script():
    return load_benchmark('train_speed')


def test_quick_run_rows_are_consistent(tmp_path):
    out = tmp_path / "train_speed.json"
    returned = load_script().main(["--quick", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned)) and report["protocol"]["threads"] == 1
    assert [(r["model"], r["format"]) for r in report["rows"]] == [("resnet20", "contiguous"),
                                                                   ("resnet20", "channels_last")]
    for r in report["rows"]:
        assert 1.5 < r["mac_ratio"] < 2.5
        for kind in ("train", "infer"):
            for side in ("dense", "pruned"):
                assert math.isclose(r[f"{kind}_{side}_s"], statistics.median(r[f"{kind}_rounds_s"][side]))
            assert math.isclose(r[f"{kind}_speedup"], r[f"{kind}_dense_s"] / r[f"{kind}_pruned_s"])


def test_rejects_a_bad_format():
    with pytest.raises(SystemExit):
        load_script().main(["--formats", "nhwc"])
