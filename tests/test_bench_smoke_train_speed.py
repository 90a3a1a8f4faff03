"""Smoke test: benchmarks/train_speed.py --quick prunes, times dense and pruned SGD steps and inference in both
memory formats for every variant, and writes JSON whose speed-ups follow from the medians stored beside them;
the variant helpers (benchmarks/train_variants.py) count padded MACs and parse variant names."""
import json
import math
import statistics

import pytest
import torch
from torch import nn

from tests.bench_scripts import load_benchmark



def load_script():
    return load_benchmark('train_speed')


def test_quick_run_rows_are_consistent(tmp_path):
    out = tmp_path / "train_speed.json"
    returned = load_script().main(["--quick", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned)) and report["protocol"]["threads"] == 1
    assert [(r["model"], r["format"], r["variant"]) for r in report["rows"]] == [
        ("resnet20", fmt, v) for fmt in ("contiguous", "channels_last") for v in ("pruned", "round8", "ideal")]
    for r in report["rows"]:
        assert 1.5 < r["mac_ratio"] < 2.5, r["variant"]
        assert r["padded16_mac_ratio"] == 1.0  # width 4: every layer's channels pad to the same 16
        for kind in ("train", "infer"):
            for side, key in (("dense", "dense"), ("pruned", r["variant"])):
                assert math.isclose(r[f"{kind}_{side}_s"], statistics.median(r[f"{kind}_rounds_s"][key]))
            assert math.isclose(r[f"{kind}_speedup"], r[f"{kind}_dense_s"] / r[f"{kind}_pruned_s"])
    round8 = [r for r in report["rows"] if r["variant"] == "round8"][0]
    assert all(w % 8 == 0 for w in round8["widths"][-7:])  # stage 3 (16 wide at width 4) keeps multiples of 8


def test_rejects_a_bad_format():
    with pytest.raises(SystemExit):
        load_script().main(["--formats", "nhwc"])


def test_rejects_an_unknown_variant():
    with pytest.raises(SystemExit):
        load_script().main(["--variants", "pruned,round1"])


def test_padded_macs_round_channels_up_to_the_block():
    parts = load_benchmark("train_variants")
    net = nn.Sequential(nn.Conv2d(3, 19, 3, padding=1), nn.Flatten(), nn.Linear(19 * 64, 5))
    macs, padded = parts.padded_macs(net, torch.randn(2, 3, 8, 8))
    assert macs == 2 * (64 * 9 * 3 * 19 + 19 * 64 * 5)
    assert padded == 2 * (64 * 9 * 16 * 32 + 1216 * 16)  # 3 -> 16 and 19 -> 32 channels; 1216 features stay


def test_variant_names():
    parts = load_benchmark("train_variants")
    assert parts.variant_kwargs("round16") == {"round_to": 16} and parts.variant_kwargs("uniform") == {"uniform": True}
    assert parts.variant_kwargs("round16keep") == {"round_to": 16, "keep_narrow": True}
    assert parts.variant_kwargs("pruned") == {} and parts.variant_kwargs("ideal") is None
    with pytest.raises(ValueError, match="unknown variant"):
        parts.variant_kwargs("round")


def test_round_keep_leaves_the_narrow_layers_whole():
    parts = load_benchmark("train_variants")
    from obafx.bench import models
    torch.manual_seed(0)
    dense, x = models.resnet20(width=8), torch.randn(1, 1, 32, 32)  # stages 8/16/32 wide
    widths = lambda m: [c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d)]  # noqa: E731
    keep = widths(parts.build_variant("resnet20", "round8keep", dense, x, 0.5, {"width": 8}))
    free = widths(parts.build_variant("resnet20", "round8", dense, x, 0.5, {"width": 8}))
    assert keep[:7] == [8] * 7 and free[:7] != [8] * 7  # stage 1 (8 wide): whole only with keep
    assert all(w % 8 == 0 for w in keep[7:])


def test_readme_tables_show_every_variant():
    head = load_benchmark("readme_headlines")
    rows = [{"model": m, "format": f, "variant": v, "batch": 8, "mac_ratio": 2.0, "padded16_mac_ratio": 1.25,
             "train_speedup": 1.5, "train_speedup_cpu": 1.625, "infer_speedup": 1.4, "infer_speedup_cpu": 1.375}
            for m in ("resnet20", "vit_tiny") for f in ("contiguous", "channels_last") for v in ("pruned", "ideal")]
    d = {"rows": rows, "settings": {"budget": 0.5, "batch": 8, "variants": ["pruned", "ideal"]}}
    full, short = head.train_speed_full(d), head.train_speed(d)
    assert full.count("| resnet20 |") == 4 and full.count("| vit_tiny |") == 4
    assert "| resnet20 | channels_last | ideal | 2.00 | 1.25 | 1.62 (1.50) | 1.38 (1.40) |" in short
    assert short.count("| resnet20 |") == 2 and "| vit_tiny |" not in short and "x0.71" in short
    old = {"rows": [{k: v for k, v in rows[0].items() if k not in ("variant", "padded16_mac_ratio")}]}
    assert "| resnet20 | contiguous | pruned | 2.00 | - |" in head.train_speed_full(old)
