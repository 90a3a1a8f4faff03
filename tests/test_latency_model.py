"""The latency cost model: table interpolation, the layers it covers, and estimates against rewritten modules."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from obafx.passes.channel_graph import analyze
from obafx.passes.coupling import couple
from obafx.passes.latency_model import LatencyModel, LayerTable, element_weights, grid_widths, layer_specs
from obafx.passes.rewrite import rewrite
from obafx.passes.trace import trace

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


class DepthwiseNet(nn.Module):
    """A stem, a depthwise conv (in = out, tied), a pointwise conv and a classifier (output width pinned)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.b = nn.Conv2d(16, 24, 1)
        self.fc = nn.Linear(24, 5)
        self.act = nn.GELU()  # a module call that is not a layer

    def forward(self, x):
        x = self.act(self.dw(torch.relu(self.a(x))))
        return self.fc(self.b(x).mean((2, 3)))


def _bilinear(i, o):
    return 1e-6 * (3.0 + 0.5 * i + 0.25 * o + 0.125 * i * o)


def _table(ins, outs, fn):
    return LayerTable(tuple(ins), tuple(outs), tuple(tuple(fn(i, o) for o in outs) for i in ins))


def test_table_is_exact_for_bilinear_costs_inside_and_beyond_the_grid():
    table = _table((4, 8, 16), (6, 12, 24), _bilinear)
    for i, o in [(4, 6), (5, 7), (11, 20), (16, 24), (2, 3), (20, 30)]:  # on, inside and beyond the grid
        assert table.at(i, o) == pytest.approx(_bilinear(i, o), rel=1e-12)


def test_table_interpolates_piecewise_between_measured_points_and_never_goes_negative():
    table = LayerTable((1,), (2, 4, 8), ((1.0, 3.0, 4.0),))  # one row: the in width is ignored
    assert table.at(99, 3) == pytest.approx(2.0)
    assert table.at(0, 6) == pytest.approx(3.5)
    assert table.at(0, 10) == pytest.approx(4.5)  # the last segment extended
    assert table.at(0, -10) == 0.0  # extended below zero: clamped
    again = LayerTable.from_dict(table.to_dict())
    assert again == table
    with pytest.raises(ValueError):
        LayerTable.from_dict({"in": [1, 2], "out": [2], "seconds": [[1.0]]})


def test_monotone_tables_never_get_faster_with_more_channels():
    table = LayerTable((1, 2, 3), (1, 2), ((1.0, 0.5), (0.8, 2.0), (3.0, 1.0)))
    assert table.monotone().seconds == ((1.0, 1.0), (1.0, 2.0), (3.0, 3.0))
    assert _table((4, 8), (2, 4), _bilinear).monotone() == _table((4, 8), (2, 4), _bilinear)  # already monotone


def test_grid_widths_are_distinct_rounded_fractions_with_the_full_width():
    assert grid_widths(10, (0.25, 0.5, 0.75, 1.0), True) == (2, 5, 8, 10)
    assert grid_widths(3, (0.1, 0.2, 0.5), True) == (1, 2, 3)
    assert grid_widths(10, (0.25, 0.5), False) == (10,)


def _analysed(model, x):
    traced = trace(model, x, [])
    facts = analyze(traced)
    return traced, facts, couple(facts, [])


def test_layer_specs_cover_convs_linears_and_depthwise_with_pinned_output():
    traced, facts, coupling = _analysed(DepthwiseNet(), torch.randn(2, 3, 8, 8))
    specs = {s.name: s for s in layer_specs(traced.gm, facts.shapes, coupling)}
    assert set(specs) == {"a", "dw", "b", "fc"}
    assert specs["a"].in_slot is None and specs["a"].out_slot == ("a.weight", 0)  # the input image is pinned
    assert specs["dw"].tied and specs["dw"].input_shape == (2, 16, 8, 8)
    assert specs["fc"].out_slot is None and specs["fc"].in_slot == ("fc.weight", 1)  # the output is pinned
    assert specs["b"].signature() != specs["a"].signature()


def test_estimate_equals_the_tables_at_the_rewritten_modules_widths():
    torch.manual_seed(0)
    traced, facts, coupling = _analysed(DepthwiseNet(), torch.randn(2, 3, 8, 8))
    specs = layer_specs(traced.gm, facts.shapes, coupling)
    fn = {"a": _bilinear, "dw": lambda i, o: 2e-6 * o, "b": lambda i, o: 1e-7 * i * o, "fc": lambda i, o: 1e-6 * i}
    tables = {s.signature(): _table((s.in_width,) if s.tied or s.in_slot is None else range(1, s.in_width + 1, 5),
                                    range(1, s.out_width + 1, 3), fn[s.name]) for s in specs}
    model = LatencyModel(coupling, specs, tables, rest_seconds=1e-4)
    units = sorted(coupling.unit_group())
    rng = np.random.default_rng(0)
    for removed in [set(), set(rng.choice(units, 10, replace=False).tolist()), set(units[::3])]:
        gm = rewrite(traced, coupling, facts.shapes, removed)
        mods = dict(gm.named_modules())
        width = {"a": (3, mods["a"].out_channels), "dw": (mods["dw"].in_channels, mods["dw"].out_channels),
                 "b": (mods["b"].in_channels, mods["b"].out_channels), "fc": (mods["fc"].in_features, 5)}
        expected = sum(fn[name](i, o) for name, (i, o) in width.items())
        expected += 1e-4 * (1 - len(removed) / len(units))
        assert model.estimate(removed) == pytest.approx(expected, rel=1e-9)


def test_the_rest_scales_with_the_output_elements_of_untimed_nodes():
    """DepthwiseNet's untimed computing nodes: relu(a(x)) and act(dw(.)) of (2, 16, 8, 8), and the mean of
    (2, 24); a unit of the 16-wide group carries 2 x 2 x 8 x 8 of their elements, one of the 24-wide group 2."""
    traced, facts, coupling = _analysed(DepthwiseNet(), torch.randn(2, 3, 8, 8))
    specs = layer_specs(traced.gm, facts.shapes, coupling)
    weights, total = element_weights(traced.gm, facts.shapes, coupling, {s.name for s in specs})
    assert total == 2 * (2 * 16 * 8 * 8) + 2 * 24
    slot = coupling.slot_units
    wide, narrow = slot[("dw.weight", 0)], slot[("b.weight", 0)]
    assert set(weights[wide]) == {2 * 2 * 8 * 8} and set(weights[narrow]) == {2.0}
    tables = {s.signature(): LayerTable((s.in_width,), (s.out_width,), ((0.0,),)) for s in specs}
    model = LatencyModel(coupling, specs, tables, rest_seconds=1.0, elements=(weights, total))
    removed = {int(wide[0]), int(wide[1]), int(narrow[0])}
    assert model.estimate(removed) == pytest.approx(1.0 - (2 * 256 + 2) / total)
    assert model.estimate(set()) == pytest.approx(1.0)
