"""Latency timing: options checks, standalone layers, grid tables and alternating measurement (fake timers only:
no test depends on real timing)."""
import pytest
import torch
import torch.nn as nn

from obafx.latency_timing import LatencyOptions, alternate, measure_tables, standalone
from obafx.passes.errors import ConfigError
from obafx.passes.latency_model import LayerSpec


def params_timer(module, args):
    """Deterministic: one microsecond per parameter."""
    return 1e-6 * sum(p.numel() for p in module.parameters())


def test_alternate_reports_medians_ratio_and_protocol():
    calls = []

    def timer(module, args):
        calls.append(module)
        return params_timer(module, args)

    dense, small = nn.Linear(8, 8), nn.Linear(8, 2)
    opts = LatencyOptions(timer=timer, reps=3, rounds=4, threads=1, progress=False, cache="")
    m = alternate(dense, small, (torch.randn(5, 8),), opts)
    assert m["dense_s"] == pytest.approx(72e-6) and m["pruned_s"] == pytest.approx(18e-6)
    assert m["ratio"] == pytest.approx(0.25) and m["speedup"] == pytest.approx(4.0)
    assert m["batch"] == 5 and m["rounds"] == 4 and m["reps"] == 3 and m["threads"] == 1
    assert m["timer"] == "custom timer" and m["dense_spread_s"] == [pytest.approx(72e-6)] * 2
    sizes = [sum(p.numel() for p in c.parameters()) for c in calls]
    assert sizes[:6] == [72] * 3 + [18] * 3 and sizes[6:12] == [18] * 3 + [72] * 3  # order swaps every round
    assert dense.training  # the caller's modules are untouched (copies are timed in eval mode)


def test_standalone_layers_have_the_requested_widths_and_input():
    conv = LayerSpec("c", "conv", 8, 16, (2, 8, 9, 9), (2, (3, 3), (2, 2), (1, 1), (1, 1), False), ("c.weight", 1),
                     ("c.weight", 0))
    layer, (x,) = standalone(conv, 5, 7)
    assert layer(x).shape == (2, 7, 5, 5) and layer.bias is None
    dw = LayerSpec("d", "conv", 8, 8, (1, 8, 4, 4), (2, (3, 3), (1, 1), (1, 1), (1, 1), True), None, ("d.weight", 0),
                   tied=True)
    layer, (x,) = standalone(dw, 3, 3)
    assert layer.groups == 3 and layer(x).shape == (1, 3, 4, 4)
    lin = LayerSpec("l", "linear", 6, 4, (2, 10, 6), (True,), ("l.weight", 1), None)
    layer, (x,) = standalone(lin, 3, 4)
    assert layer(x).shape == (2, 10, 4)


def test_measure_tables_times_each_distinct_layer_on_its_grid():
    spec = LayerSpec("l", "linear", 8, 4, (2, 8), (True,), ("l.weight", 1), ("l.weight", 0))
    twin = LayerSpec("m", "linear", 8, 4, (2, 8), (True,), ("m.weight", 1), ("m.weight", 0))
    opts = LatencyOptions(timer=params_timer, reps=1, grid=(0.5, 1.0), progress=False, cache="")
    tables = measure_tables([spec, twin], opts, (torch.randn(2, 8),))
    assert list(tables) == [spec.signature()] == [twin.signature()]  # same signature: measured once
    table = tables[spec.signature()]
    assert table.in_widths == (4, 8) and table.out_widths == (2, 4)
    assert table.seconds == tuple(tuple(1e-6 * (i * o + o) for o in (2, 4)) for i in (4, 8))


@pytest.mark.parametrize("kwargs,words", [
    (dict(mode="jit"), "'eager' or 'compile'"), (dict(reps=0), "positive integer"),
    (dict(candidates=0), "candidates"), (dict(threads=1.5), "threads"),
    (dict(grid=(0.0, 1.0)), "fractions in (0, 1]"), (dict(tolerance=1.5), "tolerance"),
    (dict(dtype=torch.int8), "floating"), (dict(device="nonsense"), "not a device"),
    (dict(warmup=-1), "warmup"), (dict(clock="cpu"), "'wall' or 'process'"),
    (dict(clock="process", threads=2), "one thread"), (dict(clock="process"), "one thread")])
def test_bad_options_are_config_errors(kwargs, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        LatencyOptions(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_an_absent_device_is_a_config_error():
    with pytest.raises(ConfigError, match="no such device is available"):
        LatencyOptions(device="cuda")


def test_sampler_warms_up_once_then_only_samples(monkeypatch):
    import obafx.latency_timing as LT

    class Counting(nn.Module):
        calls = 0

        def forward(self, x):
            Counting.calls += 1
            return x

    monkeypatch.setattr(LT, "MIN_SAMPLE_S", 0.0)  # one call per sample, whatever the clock says
    sampler = LT.Sampler(Counting(), (torch.zeros(1),), LatencyOptions(reps=2, warmup=3, progress=False, cache=""))
    assert sampler.median() >= 0 and Counting.calls == 3 + 1 + 2  # warm-up, calibration, samples
    sampler.median()
    assert Counting.calls == 3 + 1 + 2 + 2 and sampler.calls == 1


def test_a_second_look_pools_its_rounds_with_the_first():
    draws = iter([1.0, 0.5, 0.5, 1.0, 3.0, 0.9, 0.9, 3.0])  # rounds alternate the order: d p, p d, d p, p d

    def timer(module, args):
        return next(draws)

    opts = LatencyOptions(timer=timer, reps=1, rounds=2, threads=1, progress=False, cache="")
    dense, small = nn.Linear(8, 8), nn.Linear(8, 2)
    first = alternate(dense, small, (torch.randn(5, 8),), opts)
    assert first["dense_rounds_s"] == [1.0, 1.0] and first["pruned_rounds_s"] == [0.5, 0.5]
    again = alternate(dense, small, (torch.randn(5, 8),), opts, earlier=first)
    assert again["dense_rounds_s"] == [1.0, 1.0, 3.0, 3.0] and again["pruned_rounds_s"] == [0.5, 0.5, 0.9, 0.9]
    assert again["ratio"] == pytest.approx(0.7 / 2.0) and again["rounds"] == 4  # medians of the pooled rounds
