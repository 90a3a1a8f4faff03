"""Kernel blocks in the latency cost model: step detection from (fake) measurements, padded interpolation, tables
measured on block edges, and selections that keep whole blocks only when the cost says so. Deterministic: every
cost is a function of the widths, never the clock."""
import json
import math

import pytest
import torch
import torch.nn as nn

import obafx
from obafx.latency_timing import LatencyOptions, measure_tables
from obafx.passes.facts import Budget
from obafx.passes.latency_blocks import detect_block, group_blocks, padded, probe_widths
from obafx.passes.latency_cache import cache_key, load_tables, store_tables
from obafx.passes.latency_model import LatencyModel, LayerSpec, LayerTable, grid_widths, layer_specs
from obafx.passes.select import select
from tests.test_latency_budget import MacTimer, Net, hooked_seconds
from tests.test_latency_model import _analysed

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def step(block, base=1.0, per=1.0, slope=0.0):
    """Seconds of a kernel that pads the width to ``block``, plus a small ``slope`` per real channel."""
    return lambda w: base + per * math.ceil(w / block) * block + slope * w


@pytest.mark.parametrize("width,block", [(20, 4), (20, 8), (20, 16), (40, 8), (64, 16), (100, 4), (100, 16),
                                         (256, 8), (256, 16), (256, 4)])
def test_a_step_shaped_cost_is_detected_with_its_block(width, block):
    # a 4- or 8-channel step of a 256-wide layer is 1.5-3% of its cost: below the noise floor (5%), so no block
    expected = 1 if (width, block) in ((256, 4), (256, 8)) else block
    assert detect_block(width, (4, 8, 16, 32, 64), step(block)) == expected


def test_the_block_comes_from_the_measurements_not_from_a_fixed_list_order():
    assert detect_block(56, (4, 8, 12, 16), step(12)) == 12  # not a power of two: at the shared edge 48
    assert detect_block(40, (4, 8, 12, 16), step(12)) == 12  # at its own edge 36 (the shared one, 32, is not one)
    assert detect_block(96, (4, 8, 16, 32), step(32)) == 32
    # oneDNN-like: 19-21 ms from 17 to 32 channels, 5.5 ms at 16 (benchmarks/results/kernel_widths.json)
    assert detect_block(32, (4, 8, 16), lambda w: 5.5 if w <= 16 else 19.0 + 0.1 * (w - 17)) == 16


@pytest.mark.parametrize("cost", [lambda w: 3.0 + 0.5 * w, lambda w: 7.0, lambda w: 1e-3 * w * w,
                                  step(16, base=1000.0)])  # the last: steps far below the noise floor
def test_costs_that_are_not_step_functions_have_no_block(cost):
    assert detect_block(100, (4, 8, 16, 32, 64), cost) == 1


def test_a_timing_spike_is_not_a_step():
    """One slow sample just above an edge looks like a step there; it is not seen again one block lower (or at
    the same widths timed again), so the layer gets no block."""
    calls = []

    def spiky(w):
        calls.append(w)
        return 1.0 + w + (70.0 if w == 65 and calls.count(65) == 1 else 0.0)

    assert detect_block(100, (4, 8, 16, 32, 64), spiky) == 1
    assert calls.count(65) == 2  # the 64-block had no edge below 64: timed again
    assert detect_block(100, (4, 8, 16, 32, 64), step(8)) == 8  # a real step is seen at both edges


def test_probes_share_one_edge_and_stay_few():
    widths = probe_widths(100, (4, 8, 16, 32, 64))
    assert widths == (64, 65, 68, 72, 80, 96, 128)  # edge 64, one above it, and the next edge of each block
    assert probe_widths(4, (4, 8)) == () and detect_block(4, (4, 8), lambda w: 1 / 0) == 1  # nothing to probe


def test_padded_widths_stop_at_the_layer_width():
    assert [padded(w, 16, 40) for w in (1, 16, 17, 32, 33, 40)] == [16, 16, 32, 32, 40, 40]
    assert padded(17, 1, 40) == 17 and padded(0, 16, 40) == 0
    assert grid_widths(40, (0.25, 0.5, 0.75, 1.0), True, 16) == (16, 32, 40)
    assert grid_widths(40, (0.25, 0.5, 0.75, 1.0), True) == (10, 20, 30, 40)


def test_a_table_with_a_block_is_exact_on_a_step_shaped_cost_and_a_plain_one_is_not():
    cost = step(8, per=2.0)
    outs = grid_widths(64, (0.25, 0.5, 0.75, 1.0), True, 8)
    blocked = LayerTable((1,), outs, (tuple(cost(o) for o in outs),), 1, 8)
    assert all(blocked.at(1, w) == pytest.approx(cost(w)) for w in range(1, 65))
    plain_outs = grid_widths(64, (0.25, 0.5, 0.75, 1.0), True)
    plain = LayerTable((1,), plain_outs, (tuple(cost(o) for o in plain_outs),))
    assert any(abs(plain.at(1, w) - cost(w)) > 1.0 for w in range(1, 65))
    both = LayerTable((16, 32), (16, 32), ((1.0, 2.0), (3.0, 4.0)), in_block=16, out_block=16)
    assert both.at(17, 17) == both.at(32, 32) == 4.0 and both.at(16, 17) == 2.0 and both.at(17, 16) == 3.0


def block_timer(block):
    """MACs with every conv / linear channel count padded to ``block`` (depthwise: its out channels), plus the
    leaves' output elements (unpadded), 1e-9 s each: a blocked-kernel machine in miniature."""
    pad = lambda c: math.ceil(c / block) * block  # noqa: E731

    def count(m, out):
        total = 0.0
        if isinstance(m, nn.Conv2d):
            per_pixel = pad(m.out_channels) * (1 if m.groups > 1 else pad(m.in_channels))
            total += out.numel() / m.out_channels * per_pixel * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total += out.numel() / m.out_features * pad(m.out_features) * pad(m.in_features)
        return total + (out.numel() if not list(m.children()) else 0)

    def timer(module, args):
        return hooked_seconds(module, args, count)

    timer.__qualname__ = f"block_timer({block})"
    return timer


def test_measured_tables_carry_the_detected_blocks_and_sit_on_edges():
    spec = LayerSpec("l", "linear", 40, 24, (2, 40), (True,), ("l.weight", 1), ("l.weight", 0))
    opts = LatencyOptions(timer=block_timer(8), reps=1, progress=False, cache="")
    table = measure_tables([spec], opts, (torch.randn(2, 40),))[spec.signature()]
    assert (table.in_block, table.out_block) == (8, 8)
    assert all(w % 8 == 0 for w in table.in_widths + table.out_widths)
    truth = lambda i, o: 1e-9 * 2 * (math.ceil(i / 8) * 8 * math.ceil(o / 8) * 8 + o)  # noqa: E731
    assert table.at(13, 9) == pytest.approx(truth(16, 16), rel=1e-9)
    linear = measure_tables([spec], LatencyOptions(timer=MacTimer(), reps=1, progress=False, cache=""),
                            (torch.randn(2, 40),))[spec.signature()]
    assert (linear.in_block, linear.out_block) == (1, 1)
    off = measure_tables([spec], LatencyOptions(timer=block_timer(8), reps=1, progress=False, cache="", blocks=()),
                         (torch.randn(2, 40),))[spec.signature()]
    assert (off.in_block, off.out_block) == (1, 1)  # blocks=(): no probing


def test_blocks_survive_the_cache_and_old_format_files_are_not_read(tmp_path):
    parts = LatencyOptions(threads=1).key_parts((torch.randn(1, 3, 8, 8),))
    path = tmp_path / "lat.json"
    table = LayerTable((16, 32), (8, 16), ((1.0, 2.0), (3.0, 4.0)), 16, 8)
    store_tables(str(path), parts, {"sig": table})
    assert load_tables(str(path), parts)["sig"] == table
    data = json.loads(path.read_text())
    assert data["format"] == 2
    entry = data["entries"][cache_key(parts)]
    for layer in entry["layers"].values():  # what format 1 wrote: no blocks
        layer.pop("in_block"), layer.pop("out_block")
    path.write_text(json.dumps({"format": 1, "entries": data["entries"]}))
    assert load_tables(str(path), parts) == {}  # a block-blind table would price 17 channels like 16
    assert cache_key(LatencyOptions(threads=1, blocks=(8,)).key_parts((torch.randn(1, 3, 8, 8),))) != \
        cache_key(parts)


def test_group_blocks_take_the_gcd_and_drop_groups_a_costly_plain_dim_runs_through():
    unit_group = {0: "a", 1: "a", 2: "b", 3: "b", 4: "c", 5: "d"}
    dims = [([0, 1], 16, 1.0), ([0, 1], 8, 1.0), ([2, 3], 16, 1.0), ([2], 1, 0.5), ([4], 32, 1.0), ([4], 1, 0.05),
            ([5], 1, 1.0)]
    # b: a plain dim with a third of its time; c: a plain dim (a classifier) with under a tenth; d: only plain
    assert group_blocks(unit_group, dims) == {"a": 8, "c": 32}


def test_select_rounds_each_group_to_the_lcm_of_round_to_and_its_block():
    _, facts, coupling = _analysed(Net(), torch.randn(2, 3, 16, 16))
    scores = {u: float(u) for u in coupling.unit_group()}
    widths = {g.id: g.width for g in coupling.groups}
    for block, budget in ((8, Budget(channels=0.3)), (4, Budget(channels=0.5, round_to=6))):
        removed = select(coupling, scores, budget, blocks={g: block for g in widths})
        kept = {g.id: g.width - len(set(g.units) & removed) for g in coupling.groups}
        multiple = math.lcm(block, budget.round_to)  # 8, then 12
        assert all(k % multiple == 0 or k == widths[g] for g, k in kept.items()), kept
        assert any(k < widths[g] for g, k in kept.items())  # something is removed at all
    plain = select(coupling, scores, Budget(channels=0.3))
    assert any((g.width - len(set(g.units) & plain)) % 8 for g in coupling.groups)


def _kept_widths(gm):
    """Every conv / linear width of ``gm`` as (in, out)."""
    return [(m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d) else (m.in_features, m.out_features)
            for m in gm.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _pruned(timer, tmp_path, latency=0.5):
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 16, 16)
    opts = LatencyOptions(timer=timer, reps=1, rounds=1, warmup=0, progress=False, cache=str(tmp_path / "l.json"))
    pruned = obafx.compile_prune(model, x, latency=latency, latency_options=opts)
    return pruned, timer(pruned, (x,)) / timer(model, (x,))


def test_a_step_shaped_cost_lands_the_selection_on_block_edges(tmp_path):
    """Net's widths (24, 48, 32, 10 classes, 3 colours) are all on 8-edges or pinned: a blocked machine keeps
    them there, because a channel removed inside a block buys no time, and still meets the budget."""
    pruned, ratio = _pruned(block_timer(8), tmp_path)
    widths = _kept_widths(pruned)
    assert all(w % 8 == 0 or w in (3, 10) for pair in widths for w in pair), widths
    assert ratio == pytest.approx(0.5, rel=0.05)
    assert obafx.report(pruned).latency["kernel_blocks"].get("8", 0) > 0


def test_whole_blocks_are_coarse_and_a_miss_says_so(tmp_path):
    """At 0.7 the nearest whole-block selections of so small a net are more than 5% apart: the result stays on
    edges, below the target, with a note (no channel inside a block is spent to look closer)."""
    with pytest.warns(UserWarning, match="budget was missed"):
        pruned, ratio = _pruned(block_timer(8), tmp_path, 0.7)
    assert all(w % 8 == 0 or w in (3, 10) for pair in _kept_widths(pruned) for w in pair)
    assert 0.6 < ratio < 0.7 and any("budget was missed" in n for n in obafx.report(pruned).notes)


def test_a_linear_cost_does_not_round(tmp_path):
    pruned, ratio = _pruned(MacTimer(), tmp_path)
    widths = _kept_widths(pruned)
    assert any(w % 8 for pair in widths for w in pair if w not in (3, 10)), widths
    assert ratio == pytest.approx(0.5, rel=0.05)
    assert obafx.report(pruned).latency["kernel_blocks"] == {"1": len(_kept_widths(pruned))}


def test_plain_groups_absorb_what_a_blocked_groups_jump_leaves_over():
    """One group's kernel pads to 16 channels, the others cost per channel. The ranked bisection alone lands
    wherever that group's last 16-block falls (up to a block's cost below the target); the plain groups are then
    fitted again around it, so every target is met from below within one plain channel's cost, and the blocked
    group still keeps a whole number of blocks."""
    _, facts, coupling = _analysed(Net(), torch.randn(2, 3, 16, 16))
    widths = {g.id: g.width for g in coupling.groups}
    blocked = max(widths, key=widths.get)  # c1's 48 channels
    unit_group = coupling.unit_group()
    per_channel = {g: 1.0 + i for i, g in enumerate(sorted(widths))}  # groups differ in cost per channel

    def cost(removed):
        kept = {g: w - sum(1 for u in removed if unit_group[u] == g) for g, w in widths.items()}
        kept[blocked] = math.ceil(kept[blocked] / 16) * 16
        return sum(per_channel[g] * k for g, k in kept.items())

    # blocked units rank first, so the bisection moves the blocked group before any plain one
    scores = {u: (0.0 if unit_group[u] == blocked else 1.0) + u * 1e-3 for u in unit_group}
    dense, step = cost(set()), max(per_channel[g] for g in widths if g != blocked)
    for fraction in (0.9, 0.8, 0.7, 0.6, 0.5):
        target = fraction * dense
        removed = select(coupling, scores, Budget(macs=fraction), cost, target, blocks={blocked: 16})
        kept_blocked = widths[blocked] - sum(1 for u in removed if unit_group[u] == blocked)
        assert kept_blocked % 16 == 0
        assert target - step < cost(removed) <= target, (fraction, cost(removed), target)
