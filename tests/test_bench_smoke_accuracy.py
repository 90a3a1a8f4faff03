"""Smoke run of benchmarks/accuracy.py on a tiny setting: the JSON has the documented shape; --merge combines."""
import importlib.util
import json
import shlex
import sys
from pathlib import Path

import pytest

from obafx.bench.data import default_root

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"oba_residual", "magnitude", "tp_taylor"}


def _bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("accuracy_bench", ROOT / "benchmarks" / "accuracy.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_schedule_and_family_choice():
    """One exponential schedule serves every budget; the fine-tune phase picks each family's best mean row."""
    bench = _bench()
    assert bench.proto.segment_steps([2.0, 3.0, 4.0], 20) == [20, 12, 8]  # 2x after 20 steps, 3x after 32, 4x 40
    assert bench.proto.segment_steps([3.0], 20) == [32]
    rows = [{"model": "m", "method": meth, "family": fam, "factor": 2.0, "seed": s, "acc_pruned": acc}
            for meth, fam, s, acc in [("a", "OBA", 0, 0.5), ("a", "OBA", 1, 0.9), ("b", "OBA", 0, 0.8),
                                      ("b", "OBA", 1, 0.7), ("c", "magnitude", 0, 0.1)]]
    assert bench.res.best_per_family(bench.res.summarise(rows)) == {("m", 2.0, "OBA"): "b", ("m", 2.0, "magnitude"): "c"}
    merged = bench.res.merge_rows([rows, [{**rows[0], "acc_finetuned": 0.6}, {**rows[1], "error": "x"}]])
    assert len(merged) == 5 and merged[0]["acc_finetuned"] == 0.6 and "error" not in merged[1]


@pytest.mark.skipif(not any(default_root().glob("*")), reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)")
def test_accuracy_quick(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snapshots (and a fallback model cache) go under the tmp dir
    bench = _bench()
    out = tmp_path / "acc.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = [r for r in data["rows"] if r["method"] != "dense"]
    assert {r["method"] for r in rows} == METHODS
    dense = [r for r in data["rows"] if r["method"] == "dense"][0]
    for r in rows:
        assert "error" not in r, r
        assert 0 < r["macs_ratio"] < 0.75 and 0 <= r["acc_pruned"] <= 1 and 0 <= r["acc_finetuned"] <= 1
        assert set(r["widths"]) == set(dense["widths"]) and r["widths"] != dense["widths"]
        assert Path(r["snapshot"]).is_file()
    assert {s["method"] for s in data["summary"]} == METHODS
    assert "Fashion-MNIST" in data["data_set"] and "steps per halving" in data["protocol"]
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
    assert {s["factor"] for s in both["summary"]} == {2.0, 3.0}
    assert merged.with_suffix(".png").exists() and (tmp_path / "merged_widths.png").exists()
    # --drop leaves out the named rows of the named parts only (superseded by a later run)
    gone = sorted(r["method"] for r in rows)[0]
    assert bench.main(["--merge", f"{out},{tmp_path / 'b.json'}", "--out", str(merged),
                       "--drop", f"b.json:{rows[0]['model']}:{gone}"]) == 0
    fewer = json.loads(merged.read_text())
    kept = [(r["method"], r.get("factor")) for r in fewer["rows"]]
    assert (gone, 3.0) not in kept and (gone, 2.0) in kept and len(kept) == len(both["rows"]) - 1
    assert shlex.split(fewer["command"])[-2:] == ["--drop", f"b.json:{rows[0]['model']}:{gone}"]


def test_verdict_rule():
    """The per-cell verdict: default mean >= best baseline mean - pooled std; OBA variants are not baselines."""
    bench = _bench()
    default = bench.res.DEFAULT_METHODS[0]  # the method name of the library's default OBA
    rows = [{"model": "m", "method": meth, "family": fam, "factor": f, "seed": s, "acc_pruned": acc}
            for f, best in ((2.0, 0.75), (3.0, 0.8))
            for meth, fam, s, acc in [(default, "OBA", 0, 0.8), (default, "OBA", 1, 0.6),
                                      ("oba_full", "OBA", 0, 0.99), ("oba_full", "OBA", 1, 0.99),
                                      ("taylor", "Taylor", 0, best), ("taylor", "Taylor", 1, best),
                                      ("random", "random", 0, 0.1), ("random", "random", 1, 0.1)]]
    v = bench.res.verdicts(bench.res.summarise(rows))
    by_factor = {c["factor"]: c for c in v["cells"]}
    assert set(by_factor) == {2.0, 3.0} and all(c["column"] == "acc_pruned" for c in v["cells"])
    pooled = (0.1 ** 2 / 2) ** 0.5  # default's std 0.1 over two seeds, taylor's 0
    for f, margin, within in ((2.0, -0.05, True), (3.0, -0.1, False)):
        c = by_factor[f]
        assert c["best_baseline"] == "taylor" and abs(c["margin"] - margin) < 1e-12
        assert abs(c["pooled_std"] - pooled) < 1e-12 and c["within_one_std"] is within and not c["one_seed"]
    assert abs(v["mean_margin"]["acc_pruned"] - (-0.075)) < 1e-12 and v["all_within_one_std"] is False


def test_the_verdict_of_another_configuration_reads_its_own_rows():
    """verdicts() judges the library's default OBA (oba_group's rows); verdicts(methods=...) the named rows (the
    paper's criterion) against the same baselines, and the README line names it and marks a lost cell."""
    bench = _bench()
    group_row = bench.res.DEFAULT_METHODS[0]  # the method name of oba_group's current defaults
    rows = [{"model": "m", "method": meth, "family": fam, "factor": 2.0, "seed": s, "acc_pruned": acc}
            for meth, fam, s, acc in [("oba_default", "OBA", 0, 0.5), ("oba_default", "OBA", 1, 0.5),
                                      (group_row, "OBA", 0, 0.9), (group_row, "OBA", 1, 0.9),
                                      ("taylor", "Taylor", 0, 0.7), ("taylor", "Taylor", 1, 0.7)]]
    summary = bench.res.summarise(rows)
    default, paper = bench.res.verdicts(summary), bench.res.verdicts(summary, bench.res.PAPER_METHODS, "oba")
    assert abs(default["cells"][0]["margin"] - 0.2) < 1e-12 and abs(paper["cells"][0]["margin"] + 0.2) < 1e-12
    assert default["all_within_one_std"] and not paper["all_within_one_std"]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import readme_headlines
    assert 'importance="oba"' in readme_headlines._verdict_compact(paper, "paper")
    assert "**no**" in readme_headlines._verdict_compact(paper, "paper") and "**no**" in readme_headlines._verdict(paper)
    for text in (readme_headlines._verdict(default), readme_headlines._verdict_compact(default, "default")):
        assert 'importance="oba_group"' in text and "**no**" not in text


def test_the_widths_plot_draws_the_headline_rows_only():
    """Per model: the default OBA and the paper's criterion (whatever their accuracy) and the best row of every
    family at that budget; a family's weaker rows and other budgets' bests are left out."""
    bench = _bench()
    default, paper = bench.res.DEFAULT_METHODS[0], bench.res.PAPER_METHODS[0]
    rows = [{"model": "m", "method": meth, "family": fam, "factor": f, "seed": 0, "acc_pruned": acc}
            for f in (2.0, 3.0)
            for meth, fam, acc in [(default, "OBA", 0.5), (paper, "OBA", 0.4), ("oba_full", "OBA", 0.9),
                                   ("taylor", "Taylor", 0.8 if f == 3.0 else 0.1),
                                   ("taylor_abs", "Taylor", 0.7 if f == 3.0 else 0.2), ("random", "random", 0.3)]]
    shown = bench.res.headline_methods(bench.res.summarise(rows), 3.0)
    assert shown == {"m": {default, paper, "oba_full", "taylor", "random"}}
    assert bench.res.headline_methods(bench.res.summarise(rows), 2.0)["m"] >= {"taylor_abs"}
