"""End-to-end tests of compile_prune: budgets, steps, plans, the report, the user's model untouched."""
import copy

import pytest
import torch
import torch.nn as nn
import torchvision

import obafx
from obafx.passes.channel_graph import analyze
from obafx.passes.coupling import couple
from obafx.passes.facts import PrunePlan
from obafx.passes.macs import thop_macs
from obafx.passes.plan import removed_from_plan
from obafx.passes.trace import trace


def small_resnet():
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10).eval()
    for mod in m.modules():  # randomise norms so a wrong index cannot hide behind default init
        if isinstance(mod, nn.BatchNorm2d):
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.normal_()
            mod.running_mean.normal_()
            mod.running_var.uniform_(0.5, 2.0)
    return m.double()


X = torch.randn(2, 3, 32, 32, dtype=torch.float64)


@pytest.mark.parametrize("target", [0.7, 0.5, 0.3])
def test_macs_budget_met_within_two_percent(target):
    m = small_resnet()
    pruned = obafx.compile_prune(m, X, macs=target)
    rep = obafx.report(pruned)
    measured, _ = thop_macs(pruned, (X,))
    assert measured == rep.macs_after
    assert abs(rep.macs_ratio - target) <= 0.02
    assert rep.masked_error < 1e-9  # no normalisation mixes channels in a ResNet: masking is exact


def test_iterative_steps_reach_target_and_plan_replays():
    m = small_resnet()
    pruned = obafx.compile_prune(m, X, macs=0.5, steps=3)
    rep = obafx.report(pruned)
    assert abs(rep.macs_ratio - 0.5) <= 0.02
    traced = trace(m, X)
    coupling = couple(analyze(traced))
    removed = removed_from_plan(coupling, PrunePlan.from_dict(rep.plan))  # composed plan fits the original
    assert removed
    assert rep.masked_error < 1e-9


def test_channels_budget_and_round_to():
    m = small_resnet()
    pruned = obafx.compile_prune(m, X, channels=0.4, round_to=8)
    rep = obafx.report(pruned)
    widths = [g["width_after"] for g in rep.groups]
    assert all(w % 8 == 0 for w in widths)
    removed = sum(g["width_before"] - g["width_after"] for g in rep.groups)
    total = sum(g["width_before"] for g in rep.groups)
    assert 0.3 <= removed / total <= 0.41


def test_keep_narrow_keeps_groups_at_most_round_to_whole():
    """round_to=8, keep_narrow=True on a ResNet-20 at width 8 (stages 8/16/32 wide): stage 1 is left whole, every
    other group keeps a multiple of 8, and the MAC budget is still met (from the wider stages)."""
    from obafx.bench.models import resnet20
    torch.manual_seed(0)
    m, x = resnet20(width=8), torch.randn(2, 1, 32, 32)
    rep = obafx.report(obafx.compile_prune(m, x, macs=0.5, round_to=8, keep_narrow=True))
    assert all(g["width_after"] == g["width_before"] for g in rep.groups if g["width_before"] <= 8)
    assert all(g["width_after"] % 8 == 0 for g in rep.groups if g["width_before"] > 8)
    assert any(g["width_after"] < g["width_before"] for g in rep.groups) and abs(rep.macs_ratio - 0.5) < 0.03
    free = obafx.report(obafx.compile_prune(m, x, macs=0.5, round_to=8))
    assert any(g["width_after"] < g["width_before"] for g in free.groups if g["width_before"] <= 8)


def test_keep_all_is_identity():
    m = small_resnet()
    pruned = obafx.compile_prune(m, X, channels=1e-9)
    assert torch.equal(pruned(X), m(X))


def test_user_model_untouched_and_plan_json():
    m = small_resnet().train()
    before = copy.deepcopy(m.state_dict())
    pruned = obafx.compile_prune(m, X, macs=0.5)
    assert m.training
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    rep = obafx.report(pruned)
    plan = PrunePlan.from_dict(rep.plan)
    assert PrunePlan.from_dict(__import__("json").loads(plan.to_json())) == plan
    params = dict(pruned.named_parameters())
    for name, dims in rep.plan.items():
        if name in params:
            for d, idx in dims.items():
                assert params[name].shape[int(d)] == len(idx)


def test_output_width_never_changes_and_ignore():
    m = small_resnet()
    pruned = obafx.compile_prune(m, X, channels=0.5, ignore=["layer4"])
    assert pruned(X).shape == m(X).shape
    sd_before, sd_after = m.state_dict(), pruned.state_dict()
    for k, v in sd_after.items():
        if k.startswith("layer4.") and "conv1" in k:
            assert v.shape == sd_before[k].shape


def test_pruned_module_traces_scripts_and_exports():
    m = small_resnet().float()
    x = X.float()
    pruned = obafx.compile_prune(m, x, macs=0.5)
    y = pruned(x)
    assert torch.allclose(torch.fx.symbolic_trace(pruned)(x), y)
    assert torch.allclose(torch.jit.trace(pruned, x)(x), y, atol=1e-5)
    assert torch.allclose(torch.jit.script(pruned)(x), y, atol=1e-5)
    ep = torch.export.export(pruned, (x,))
    assert torch.allclose(ep.module()(x), y, atol=1e-5)


def test_report_requires_obafx_module():
    with pytest.raises(obafx.ConfigError):
        obafx.report(nn.Linear(2, 2))


def test_unknown_importance_is_a_clear_error():
    with pytest.raises(obafx.ConfigError, match="importance"):
        obafx.compile_prune(small_resnet(), X, macs=0.5, importance="nope")


def test_custom_importance_callable_is_the_seam():
    seen = {}

    def lowest_index_first(model, coupling, ctx):
        seen["groups"] = len(coupling.groups)
        return {u: float(i) for g in coupling.groups for i, u in enumerate(g.units)}

    m = small_resnet()
    pruned = obafx.compile_prune(m, X, channels=0.25, importance=lowest_index_first)
    rep = obafx.report(pruned)
    assert seen["groups"] == len(rep.groups)
    # lowest scores go first: each pruned group lost its first indices along its root slot
    group = rep.groups[1]
    name, dim = group["members"][0].rsplit(":", 1)
    kept, width = rep.plan[name][dim], group["width_before"]
    assert kept == list(range(width - len(kept), width))


@pytest.mark.parametrize("steps", [1, 2])
def test_no_stage_runs_twice_on_the_same_module(monkeypatch, steps):
    """The first step reuses compile_prune's analysis; a MAC budget's measured candidate is the result (not
    rewritten again) and its thop count serves the next step and the report."""
    import obafx.api as api
    from obafx import stages

    calls = {"analyze": [], "rewrite": [], "thop_macs": []}
    for name in calls:
        where = api if name == "thop_macs" else stages  # the stages are called as obafx.stages.<name>
        real = getattr(where, name)
        monkeypatch.setattr(where, name,
                            lambda *a, _real=real, _name=name, **k: calls[_name].append(a[0]) or _real(*a, **k))
    pruned = obafx.compile_prune(small_resnet(), X, macs=0.5, steps=steps)
    assert len(calls["analyze"]) == steps  # once per module: the original and each intermediate one
    assert len({id(t) for t in calls["analyze"]}) == steps
    measured = [id(m) for m in calls["thop_macs"]]
    assert len(measured) == len(set(measured))  # thop counts each module once
    assert len(calls["rewrite"]) == len(calls["thop_macs"]) - 1  # every rewrite measured once, plus the original
    assert obafx.report(pruned).macs_after == thop_macs(pruned, (X,))[0]
