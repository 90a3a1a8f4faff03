"""Selection: ranking, per-group caps, round_to, budgets and their errors."""
import pytest
import torch
import torch.nn as nn

from obafx.passes.channel_graph import analyze
from obafx.passes.coupling import couple
from obafx.passes.errors import BudgetError, ConfigError
from obafx.passes.select import Budget, select
from obafx.passes.trace import trace


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 20, 3)
        self.b = nn.Conv2d(20, 30, 3)
        self.c = nn.Conv2d(30, 5, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def coupling():
    return couple(analyze(trace(Chain(), torch.randn(1, 3, 16, 16))))


def test_groups_are_the_two_hidden_layers():
    c = coupling()
    assert sorted(g.width for g in c.groups) == [20, 30]


def test_caps_keep_a_channel_and_respect_ratio():
    c = coupling()
    scores = {u: 0.0 for g in c.groups for u in g.units}
    removed = select(c, scores, Budget(channels=1.0, max_layer_ratio=0.5))
    for g in c.groups:
        assert sum(1 for u in g.units if u in removed) == g.width // 2


def test_lowest_scores_go_first():
    c = coupling()
    scores = {u: float(i) for gr in c.groups for i, u in enumerate(gr.units)}
    removed = select(c, scores, Budget(channels=0.2))
    for gr in c.groups:
        gone = [i for i, u in enumerate(gr.units) if u in removed]
        assert gone == list(range(len(gone)))
    assert len(removed) == round(0.2 * 50)


def test_round_to_makes_kept_widths_multiples():
    c = coupling()
    scores = {u: float(i) for gr in c.groups for i, u in enumerate(gr.units)}
    removed = select(c, scores, Budget(channels=0.5, round_to=8))
    for gr in c.groups:
        kept = gr.width - sum(1 for u in gr.units if u in removed)
        assert kept % 8 == 0 or kept == gr.width


def test_mac_budget_uses_estimate_and_errors_when_unreachable():
    c = coupling()
    scores = {u: float(i) for gr in c.groups for i, u in enumerate(gr.units)}
    estimate = lambda removed: 100.0 - len(removed)  # noqa: E731
    removed = select(c, scores, Budget(macs=0.5), estimate, target_macs=80.0)
    assert len(removed) == 20
    with pytest.raises(BudgetError, match="cannot be met"):
        select(c, scores, Budget(macs=0.5), estimate, target_macs=1.0)


@pytest.mark.parametrize("kw", [dict(macs=0.0), dict(macs=1.5), dict(channels=-0.1), dict(), dict(macs=0.5, channels=0.5),
                                dict(macs=0.5, max_layer_ratio=1.0), dict(macs=0.5, round_to=0)])
def test_bad_budgets(kw):
    with pytest.raises(ConfigError):
        Budget(**kw)


def test_mac_model_estimate_is_each_modules_macs_times_its_kept_fractions():
    """The vectorised estimate against the formula written out module by module, on a torchvision model with
    grouped convs, residual couplings and a classifier, for random removals (and nothing removed)."""
    import numpy as np
    import torchvision

    from obafx.passes.macs import MacModel, thop_macs

    model, x = torchvision.models.mobilenet_v2(num_classes=10).eval(), torch.randn(1, 3, 32, 32)
    traced = trace(model, x)
    c = couple(analyze(traced))
    per_module = thop_macs(traced.gm, traced.inputs)[1]
    slots = {}
    for (name, _), units in c.slot_units.items():
        if name.endswith((".weight", "in_proj_weight", "running_mean")):
            slots.setdefault(name.rpartition(".")[0], []).append(units)

    def by_hand(removed):
        gone = np.array(sorted(removed), dtype=np.int64)
        return sum(ops * (np.prod([np.mean(~np.isin(u, gone)) for u in slots[m]]) if m in slots else 1.0)
                   for m, ops in per_module.items())

    mac_model = MacModel(c, per_module)
    units = sorted(c.unit_group())
    rng = np.random.default_rng(0)
    for removed in [set()] + [set(rng.choice(units, size=k, replace=False).tolist()) for k in (1, 40, 400)]:
        assert mac_model.estimate(removed) == pytest.approx(by_hand(removed), rel=1e-12)
    assert mac_model.estimate(set(units[:400])) < mac_model.estimate(set())


def test_keep_narrow_leaves_groups_at_most_round_to_whole():
    c = coupling()  # groups 20 and 30 wide
    scores = {u: float(i) for gr in c.groups for i, u in enumerate(gr.units)}
    kept = lambda removed: {gr.width: gr.width - sum(u in removed for u in gr.units) for gr in c.groups}  # noqa
    free = kept(select(c, scores, Budget(channels=0.5, round_to=24)))
    narrow = kept(select(c, scores, Budget(channels=0.5, round_to=24, keep_narrow=True)))
    assert free[20] < 20 and narrow[20] == 20  # 20 <= round_to: pruned freely, or whole with keep_narrow
    assert narrow[30] in (24, 30) and free[30] in (24, 30)


def test_keep_narrow_meets_a_mac_budget_from_the_wide_groups():
    c = coupling()
    scores = {u: float(i) for gr in c.groups for i, u in enumerate(gr.units)}
    narrow = next(gr for gr in c.groups if gr.width == 20)
    estimate = lambda removed: 100.0 - len(removed)  # noqa: E731
    removed = select(c, scores, Budget(macs=0.5, round_to=20, keep_narrow=True), estimate, target_macs=90.0)
    assert not set(narrow.units) & removed and len(removed) == 10  # the 30-wide group keeps 20
    with pytest.raises(BudgetError, match="keep_narrow=True"):
        select(c, scores, Budget(macs=0.5, round_to=24, keep_narrow=True), estimate, target_macs=80.0)
