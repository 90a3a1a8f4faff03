"""Smoke run of benchmarks/random_at_widths.py: the pruned model has exactly the source row's widths, its channels
differ from run to run only by the seed, and the JSON has the documented shape."""
import json
from pathlib import Path

import pytest

from obafx.bench.data import default_root
from tests.bench_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not any(default_root().glob("*")), reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)")
def test_quick_run_keeps_the_source_widths(tmp_path):
    bench = load_benchmark("random_at_widths")
    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--sources", "taylor_abs_train", "--seeds", "0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    source = next(r for r in json.loads((ROOT / "benchmarks/results/accuracy.json").read_text())["rows"]
                  if r["model"] == "resnet20" and r["method"] == "taylor_abs_train" and r.get("factor") == 2.0
                  and r.get("seed") == 0)
    row = report["rows"][0]
    assert row["widths"] == {k: v for k, v in source["widths"].items() if k in row["widths"]}
    assert set(row["widths"]) == set(source["widths"])
    assert 0.0 < row["acc_finetuned"] <= 1.0 and report["summary"][0]["n"] == 1 and report["quick"]
    import readme_headlines  # the README's section renders from this JSON
    assert "| taylor_abs_train | 1 |" in readme_headlines.random_at_widths(report)


def test_random_choices_follow_the_seed():
    """Two seeds keep the same widths with different channels; the same seed the same channels."""
    bench = load_benchmark("random_at_widths")
    from tests.test_latency_budget import Net  # a small net with several coupled groups
    import torch
    from obafx.passes.channel_graph import analyze
    from obafx.passes.coupling import couple
    from obafx.passes.trace import trace
    traced = trace(Net().eval(), torch.randn(1, 3, 16, 16))
    facts = analyze(traced)
    coupling = couple(facts)
    layers = bench.group_layers(traced, coupling, facts.shapes)
    full = bench.proto.widths(traced.gm)
    target = {n: max(1, w // 2) for n, w in full.items()}
    a, b, c = (bench.random_at(traced, coupling, facts.shapes, layers, target, s) for s in (0, 1, 0))
    widths = bench.proto.widths(a)
    pinned = {n for n in full if not any(n in ls for ls in layers.values())}  # the classifier's output
    assert all(widths[n] == (full[n] if n in pinned else target[n]) for n in full)
    first_weight = lambda m: next(m.parameters())  # noqa: E731
    assert torch.equal(first_weight(a), first_weight(c)) and not torch.equal(first_weight(a), first_weight(b))
