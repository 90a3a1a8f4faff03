"""Smoke run of benchmarks/accuracy.py on a tiny setting: the JSON has the documented shape."""
import importlib.util
import json
from pathlib import Path

import pytest

from obafx.bench.data import default_root

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not any(default_root().glob("*")), reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)")
def test_accuracy_quick(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the model cache goes under the tmp dir
    spec = importlib.util.spec_from_file_location("accuracy_bench", ROOT / "benchmarks" / "accuracy.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "acc.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = [r for r in data["rows"] if r["method"] != "dense"]
    assert {r["method"] for r in rows} == {"oba_full", "magnitude", "tp_taylor"}
    for r in rows:
        assert "error" not in r, r
        assert 0 < r["macs_ratio"] < 0.75 and 0 <= r["acc_finetuned"] <= 1
    assert {s["method"] for s in data["summary"]} == {"oba_full", "magnitude", "tp_taylor"}
    assert "machine" in data and "command" in data
    # --merge combines runs (e.g. one per budget, run side by side) into one table and plot
    other = json.loads(out.read_text())
    for r in other["rows"]:
        if "factor" in r:
            r["factor"] = 3.0
    (tmp_path / "b.json").write_text(json.dumps({**other, "rows": [r for r in other["rows"] if "factor" in r]}))
    merged = tmp_path / "merged.json"
    assert bench.main(["--merge", f"{out},{tmp_path / 'b.json'}", "--out", str(merged)]) == 0
    both = json.loads(merged.read_text())
    assert len(both["rows"]) == len(data["rows"]) + len(rows)
    assert {s["factor"] for s in both["summary"]} == {2.0, 3.0} and any("--factors 2,3 " in c for c in both["reproduce"])
    assert merged.with_suffix(".png").exists()
