"""compile_prune(latency=...): the cost model selects, the end-to-end measurement corrects, through the shared
budget loop. Timers are deterministic fakes (cost from the module's shapes), never the wall clock."""
import pytest
import torch
import torch.nn as nn

import obafx
from obafx.passes.errors import BudgetError, ConfigError

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


class Net(nn.Module):
    """Convs of several widths, a depthwise conv, BatchNorm and a classifier: enough groups for fine steps."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1)
        self.bn = nn.BatchNorm2d(24)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.c1 = nn.Conv2d(24, 48, 1)
        self.c2 = nn.Conv2d(48, 32, 3, padding=1, stride=2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.c1(torch.relu(self.dw(x))))
        return self.fc(torch.relu(self.c2(x)).mean((2, 3)))


def hooked_seconds(module, args, count) -> float:
    """1e-9 x the sum of ``count(m, out)`` over every module's forward on one no-grad run of ``module(*args)``."""
    total = [0.0]

    def hook(m, inputs, out):
        total[0] += count(m, out)

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    try:
        with torch.no_grad():
            module(*args)
    finally:
        for h in handles:
            h.remove()
    return 1e-9 * total[0]


class MacTimer:
    """Seconds = 1e-9 x (MACs of every conv / linear + elements of every leaf's output, the element-wise work),
    counted with forward hooks on one run. Counts its calls, and which modules it timed."""

    def __init__(self):
        self.calls = 0
        self.timed = []

    def __call__(self, module, args):
        self.calls += 1
        self.timed.append(type(module).__name__)

        def count(m, out):
            macs = out.numel() * m.weight[0].numel() if isinstance(m, (nn.Conv2d, nn.Linear)) else 0
            return macs + (out.numel() if not list(m.children()) else 0)

        return hooked_seconds(module, args, count)


def whole(module) -> bool:
    """A whole model (the user's Net or a rewritten GraphModule), not a layer timed alone for the cost model."""
    return isinstance(module, (torch.fx.GraphModule, Net))


def _opts(timer, tmp_path, **kw):
    return obafx.LatencyOptions(timer=timer, reps=1, rounds=1, warmup=0, progress=False,
                                cache=str(tmp_path / "lat.json"), **kw)


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(0)
    return torch.randn(2, 3, 16, 16)


@pytest.mark.parametrize("latency,steps", [(0.5, 1), ("2x", 1), (0.4, 2), ("1.5x", 1)])
def test_measured_latency_lands_within_tolerance(tmp_path, x, latency, steps):
    timer = MacTimer()
    model = Net().eval()
    pruned = obafx.compile_prune(model, x, latency=latency, steps=steps, latency_options=_opts(timer, tmp_path))
    want = 1 / float(latency[:-1]) if isinstance(latency, str) else latency
    truth = MacTimer()(pruned, (x,)) / MacTimer()(model, (x,))  # independent of what compile_prune recorded
    assert truth == pytest.approx(want, rel=0.05)
    rep = obafx.report(pruned)
    m = rep.latency["measured"]
    assert m["ratio"] == pytest.approx(truth, rel=1e-9) and m["speedup"] == pytest.approx(1 / truth, rel=1e-9)
    assert rep.latency["requested_fraction"] == pytest.approx(want)
    assert m["timer"] == "custom timer" and m["batch"] == 2 and m["mode"] == "eager"
    assert m["rounds"] == 2  # rounds=1: the accepted candidate was measured twice (pooled) before it was kept
    # the reference is (a copy of) the user's module, not the traced GraphModule: a traced forward runs a few
    # percent slower at small batches, which would inflate every measured speed-up
    assert "Net" in timer.timed
    assert "latency: asked for" in rep.summary() and rep.masked_error < 1e-4
    assert not any("missed" in n for n in rep.notes)


def test_the_correction_loop_fixes_a_cost_model_that_is_off(tmp_path, x):
    """A whole model pays a fixed overhead (30% of the dense work) that no layer alone shows, while the cost
    model scales what the layers do not explain with the kept channels: it underestimates the pruned latency, and
    only the end-to-end measurement brings the result to the target."""
    model = Net().eval()
    overhead = 0.3 * MacTimer()(model, (x,))

    def with_overhead(module, args):
        return MacTimer()(module, args) + (overhead if whole(module) else 0.0)

    pruned = obafx.compile_prune(model, x, latency=0.5, latency_options=_opts(with_overhead, tmp_path))
    assert with_overhead(pruned, (x,)) / with_overhead(model, (x,)) == pytest.approx(0.5, rel=0.05)


def test_layer_tables_are_cached_across_runs_and_remeasured_for_a_new_setup(tmp_path, x):
    first, second, third = MacTimer(), MacTimer(), MacTimer()
    for timer in (first, second):
        timer.__qualname__ = "MacTimer"  # the same timer as far as the cache key goes
        pruned = obafx.compile_prune(Net(), x, latency=0.5, latency_options=_opts(timer, tmp_path))
    rep = obafx.report(pruned).latency
    assert rep["layer_tables_measured"] == 0 and rep["layer_tables_cached"] > 0
    assert "Conv2d" in first.timed and "Conv2d" not in second.timed  # the second run timed whole models only
    third.__qualname__ = "MacTimer"
    obafx.compile_prune(Net(), torch.randn(4, 3, 16, 16), latency=0.5, latency_options=_opts(third, tmp_path))
    assert "Conv2d" in third.timed  # another batch size: another key, measured again


def test_compiled_mode_reuses_the_eager_layer_tables(tmp_path, x):
    """mode="compile" times layers eagerly (compiling each layer at each width would take minutes): a compiled
    run after an eager one measures no layer again."""
    timer = MacTimer()
    obafx.compile_prune(Net(), x, latency=0.5, latency_options=_opts(timer, tmp_path))
    pruned = obafx.compile_prune(Net(), x, latency=0.5, latency_options=_opts(timer, tmp_path, mode="compile"))
    rep = obafx.report(pruned).latency
    assert rep["layer_tables_measured"] == 0 and rep["measured"]["mode"] == "compile"


def test_a_speedup_bounded_by_overhead_is_noted_not_faked(tmp_path, x):
    """A fixed per-call cost of twice the dense work (the cost model cannot see it apart from the rest) makes
    2x unreachable: the fastest candidate is returned, with notes that say how far it got and why."""
    model = Net().eval()
    overhead = 2.0 * MacTimer()(model, (x,))

    def with_overhead(module, args):
        return MacTimer()(module, args) + (overhead if whole(module) else 0.0)

    with pytest.warns(UserWarning, match="short of 2.00x"):
        pruned = obafx.compile_prune(model, x, latency="2x", latency_options=_opts(with_overhead, tmp_path))
    rep = obafx.report(pruned)
    reached = rep.latency["measured"]["speedup"]
    assert 1.0 < reached < 1.5
    assert any(f"runs {reached:.2f}x faster than the dense model, short of 2.00x" in n for n in rep.notes)
    assert any("budget was missed" in n for n in rep.notes)


def test_candidates_caps_the_end_to_end_measurements(tmp_path, x):
    timed = []

    def counting(module, args):
        if isinstance(module, torch.fx.GraphModule):
            timed.append(module)
        return MacTimer()(module, args)

    model = Net().eval()
    overhead = 2.0 * MacTimer()(model, (x,))  # 2x unreachable: the loop would try many candidates
    with pytest.warns(UserWarning):
        obafx.compile_prune(model, x, latency="2x", latency_options=_opts(
            lambda m, a: counting(m, a) + (overhead if whole(m) else 0.0), tmp_path,
            candidates=2))
    dense_params = sum(p.numel() for p in model.parameters())
    candidates = [m for m in timed if sum(p.numel() for p in m.parameters()) < dense_params]
    assert len(candidates) == 2  # rounds=1, reps=1: one timed call per candidate


def test_unreachable_latency_is_a_budget_error(tmp_path, x):
    with pytest.raises(BudgetError, match=r"cannot be reached: .* still keeps 0\.\d+ of the dense latency") as info:
        obafx.compile_prune(Net(), x, latency=0.001, latency_options=_opts(MacTimer(), tmp_path))
    assert "MAC" not in str(info.value)


@pytest.mark.parametrize("latency", [1.0, 1.5, 0.0, -0.2, "1x", "0.5x", "fast", True, float("nan")])
def test_latency_outside_what_means_a_speedup_is_a_config_error(x, latency):
    with pytest.raises(ConfigError, match="latency="):
        obafx.compile_prune(Net(), x, latency=latency)


def test_latency_with_another_budget_or_bad_options_is_a_config_error(x):
    with pytest.raises(ConfigError, match="exactly one budget"):
        obafx.compile_prune(Net(), x, latency=0.5, macs=0.5)
    with pytest.raises(ConfigError, match="LatencyOptions"):
        obafx.compile_prune(Net(), x, latency=0.5, latency_options={"threads": 1})
    with pytest.raises(ConfigError, match="without latency="):
        obafx.compile_prune(Net(), x, macs=0.5, latency_options=obafx.LatencyOptions())
    with pytest.raises(ConfigError, match="structured pruning"):
        obafx.compile_prune(Net(), x, latency=0.5, structure="unstructured", sparsity=0.5)


def test_nothing_to_time_with_is_a_config_error():
    with pytest.raises(ConfigError, match="nothing to time with"):
        obafx.compile_prune(Net(), None, latency=0.5)
    with pytest.raises(ConfigError, match="nothing to time with"):
        obafx.compile_prune(Net(), (3, "a"), latency="2x")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_timing_on_an_absent_device_is_a_config_error(x):
    with pytest.raises(ConfigError, match="no such device is available"):
        obafx.compile_prune(Net(), x, latency=0.5, latency_options=obafx.LatencyOptions(device="cuda"))


def test_the_latency_record_survives_save_and_load(tmp_path, x):
    pruned = obafx.compile_prune(Net(), x, latency=0.5, latency_options=_opts(MacTimer(), tmp_path))
    obafx.save(pruned, str(tmp_path / "saved"))
    again = obafx.load(str(tmp_path / "saved"), Net)
    assert obafx.report(again).latency == obafx.report(pruned).latency
    assert obafx.report(again).latency["measured"]["timer"] == "custom timer"
