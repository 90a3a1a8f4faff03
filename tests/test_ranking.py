"""normalizer= (per-group scaling of unit scores) and rank="per_mac" (raw score per MAC / parameter saved)."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import obafx
from obafx.passes.channel_graph import analyze
from obafx.passes.coupling import couple
from obafx.passes.errors import ConfigError
from obafx.passes.hvp import parameter_scores
from obafx.passes.criteria import taylor_scores
from obafx.passes.group_scores import _UnitIndex
from obafx.passes.facts import ScoreContext
from obafx.passes.importance import REGISTRY, UNIT_SUMS, aggregate, member_vectors, summands
from obafx.passes.macs import thop_macs
from obafx.passes.ranking import mac_savings, param_savings
from obafx.passes.rewrite import rewrite
from obafx.passes.trace import trace
from tests.small_nets import ConcatNet, SmoothCNN, Wide


def wide():
    torch.manual_seed(0)
    model, x = Wide().double(), torch.randn(5, 6, dtype=torch.float64)
    return model, x, trace(model, x)


def member_means(coupling, scores):
    """The paper's unit score before normalisation: mean over scored members of |member sum|."""
    out = {}
    for gi, g in enumerate(coupling.groups):
        scored = [np.abs(v) for v in member_vectors(coupling, scores)[gi].values() if np.any(v != 0)]
        out.update(zip(g.units, np.mean(scored, axis=0)))
    return out


def test_normalizers_scale_each_group_and_keep_its_order():
    model, x, traced = wide()
    coupling = couple(analyze(traced))
    s = parameter_scores(model, [(x, torch.randint(0, 4, (5,)))])
    means = member_means(coupling, s)
    for g in coupling.groups:
        r = np.array([means[u] for u in g.units])
        assert r.max() > 0
        for name, scale in (("max", r.max()), ("mean", r.mean()), ("sum", r.sum())):
            got = aggregate(coupling, s, normalizer=name)
            np.testing.assert_allclose([got[u] for u in g.units], r / scale, rtol=1e-12)


def test_raw_scores_are_each_units_total_loss_change():
    """normalizer=None: |Σ over every slice of the unit|; for Taylor that is |g_uᵀθ_u|, computed here by the
    group-exact score's own index of unit slices (an independent route through the coupling)."""
    torch.manual_seed(0)
    model, x = ConcatNet().double(), torch.randn(4, 3, 8, 8, dtype=torch.float64)
    coupling = couple(analyze(trace(model, x)))
    taylor = taylor_scores(model, [(x, torch.randint(0, 4, (4,)))])
    raw = aggregate(coupling, taylor, normalizer=None)
    index = _UnitIndex(coupling, {n: p for n, p in model.named_parameters() if n in taylor})
    want = index.per_unit({n: taylor[n] for n in index.ids}).abs()
    np.testing.assert_allclose([raw[u] for u in index.units], want.numpy(), rtol=1e-12, atol=1e-15)
    means = member_means(coupling, taylor)
    assert any(abs(raw[u] - means[u]) > 1e-6 * raw[u] for u in raw)  # not the member mean


def test_unit_sum_abs_adds_the_magnitudes_of_each_slice():
    """unit_sum="abs": Σ |θ_i g_i| over every slice of the unit (Torch-Pruning's Taylor), by the same independent
    unit index as above; "signed" stays |Σ θ_i g_i|, and the two differ where signs cancel inside a unit."""
    torch.manual_seed(0)
    model, x = ConcatNet().double(), torch.randn(4, 3, 8, 8, dtype=torch.float64)
    coupling = couple(analyze(trace(model, x)))
    batches = [(x, torch.randint(0, 4, (4,)))]
    taylor = taylor_scores(model, batches)
    index = _UnitIndex(coupling, {n: p for n, p in model.named_parameters() if n in taylor})
    units = REGISTRY["taylor"].units
    got = {s: units(model, coupling, ScoreContext(batches, normalizer=None, unit_sum=s)) for s in UNIT_SUMS}
    want_abs = index.per_unit({n: taylor[n].abs() for n in index.ids})
    want_signed = index.per_unit({n: taylor[n] for n in index.ids}).abs()
    np.testing.assert_allclose([got["abs"][u] for u in index.units], want_abs.numpy(), rtol=1e-12)
    np.testing.assert_allclose([got["signed"][u] for u in index.units], want_signed.numpy(), rtol=1e-12, atol=1e-15)
    assert np.all(want_abs.numpy() > want_signed.numpy() * (1 + 1e-9))  # cancellation in every unit


def test_unit_sum_member_adds_the_magnitudes_of_each_members_signed_sum():
    """unit_sum="member": Σ over members of |member sum| (raw), between "signed" (everything may cancel) and
    "abs" (nothing may); under a normaliser it ranks as "signed" does (the member mean of |member sum|).
    Per-parameter scores of random sign, so that members disagree in sign somewhere."""
    model, x, traced = wide()
    coupling = couple(analyze(traced))
    gen = torch.Generator().manual_seed(3)
    scores = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in model.named_parameters()}
    got = {s: aggregate(coupling, summands(scores, s), normalizer=None, unit_sum=s) for s in UNIT_SUMS}
    for gi, g in enumerate(coupling.groups):
        rows = {"a": 0, "b": 1}[g.id]  # Wide: group "a" is a's rows (+ bias) and b's columns; "b" is b's and c's
        own = scores[f"{'abc'[rows]}.weight"].sum(1) + scores[f"{'abc'[rows]}.bias"]
        nxt = scores[f"{'abc'[rows + 1]}.weight"].sum(0)
        assert len(g.units) == own.numel() == nxt.numel()
        np.testing.assert_allclose([got["member"][u] for u in g.units], (own.abs() + nxt.abs()).numpy(), rtol=1e-12)
        np.testing.assert_allclose([got["signed"][u] for u in g.units], (own + nxt).abs().numpy(), rtol=1e-12)
    member, signed, absolute = (np.array([got[s][u] for u in sorted(got["abs"])]) for s in ("member", "signed", "abs"))
    assert np.all(signed <= member * (1 + 1e-12)) and np.all(member <= absolute * (1 + 1e-12))
    assert np.any(member > signed * (1 + 1e-6)) and np.any(member < absolute * (1 - 1e-6))
    normed = {s: aggregate(coupling, summands(scores, s), normalizer="max", unit_sum=s) for s in ("member", "signed")}
    assert normed["member"] == pytest.approx(normed["signed"], rel=1e-12)


def test_criteria_hand_member_to_the_aggregation():
    """The registry's criteria pass unit_sum on to `aggregate`: on a conv -> BatchNorm (eval) net, where a unit's
    rows and next-layer columns disagree in sign, "member" gives Σ |member sum| and differs from "signed"."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU(),
                          nn.Flatten(), nn.LazyLinear(4)).double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    model(x)
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1), model[1].bias.uniform_(-0.5, 0.5)
    model.eval()
    coupling = couple(analyze(trace(model, x)))
    batches = [(x, torch.randint(0, 4, (4,)))]
    got = {s: REGISTRY["taylor"].units(model, coupling, ScoreContext(batches, normalizer=None, unit_sum=s))
           for s in ("member", "signed")}
    want = aggregate(coupling, taylor_scores(model, batches), normalizer=None, unit_sum="member")
    assert got["member"] == pytest.approx(want, rel=1e-12)
    assert any(got["member"][u] > got["signed"][u] * (1 + 1e-6) for u in want)


def test_mac_savings_match_thop_unit_by_unit():
    torch.manual_seed(0)
    model, x = ConcatNet().double(), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    traced = trace(model, x)
    facts = analyze(traced)
    coupling = couple(facts)
    total, per_module = thop_macs(traced.gm, traced.inputs)
    saved = mac_savings(coupling, per_module)
    units = [g.units[i] for g in coupling.groups for i in (0, -1)]
    for u in units:
        smaller = rewrite(traced, coupling, facts.shapes, {u})
        assert saved[u] == pytest.approx(total - thop_macs(smaller, traced.inputs)[0], rel=1e-9), u


def test_param_savings_count_every_slice_a_unit_removes():
    model, _, traced = wide()
    coupling = couple(analyze(traced))
    saved = param_savings(traced.gm, coupling)
    by_group = {g.id: {saved[u] for u in g.units} for g in coupling.groups}
    assert by_group == {"a": {6 + 1 + 32}, "b": {40 + 1 + 4}}


def fixed_scores(model, coupling, ctx):
    """a's units 1.0, b's 1.1: by score a's go first; per parameter saved (1/39 > 1.1/45) b's go first."""
    return {u: (1.0 if g.id == "a" else 1.1) for g in coupling.groups for u in g.units}


@pytest.mark.parametrize("rank,narrowed", [("score", "a"), ("per_mac", "b")])
def test_per_mac_ranks_raw_scores_per_cost(rank, narrowed):
    model, x, _ = wide()
    pruned = obafx.compile_prune(model, x, channels=0.2, importance=fixed_scores, rank=rank)
    widths = {"a": pruned.a.out_features, "b": pruned.b.out_features}
    assert widths[narrowed] == {"a": 40, "b": 32}[narrowed] - 14
    assert widths[{"a": "b", "b": "a"}[narrowed]] == {"a": 40, "b": 32}[{"a": "b", "b": "a"}[narrowed]]


def test_per_mac_with_a_mac_budget_runs_on_real_scores():
    model, x, _ = wide()
    data = [(x, torch.randint(0, 4, (5,)))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = obafx.compile_prune(model, x, macs=0.5, importance="oba", data=data, rank="per_mac", steps=2)
    assert obafx.report(pruned).macs_ratio <= 0.51


@pytest.mark.parametrize("kw,words", [
    (dict(normalizer="median"), "normalizer="), (dict(rank="per_flop"), "rank="),
    (dict(rank="per_mac", normalizer="mean"), "per_mac"), (dict(probes=0), "probes="),
    (dict(recalibrate="yes"), "recalibrate="), (dict(unit_sum="l1"), "unit_sum="),
    (dict(unit_sum="abs", importance="magnitude"), "unit_sum='abs'"),
    (dict(unit_sum="abs", importance="oba_group"), "unit_sum='abs'"),
    (dict(unit_sum="member", importance="magnitude"), "unit_sum='member'")])
def test_bad_ranking_options_are_config_errors(kw, words):
    model, x, _ = wide()
    with pytest.raises(ConfigError, match=words):
        obafx.compile_prune(model, x, channels=0.2, **kw)


@pytest.mark.parametrize("importance, explicit", [
    ("oba", dict(mode="residual", rank="per_mac", unit_sum="member", train=True)),  # the default the benchmark supports
    ("oba_group", dict(mode="full", rank="per_mac", train=True, probes=4)),
    ("taylor", dict(rank="score")),
    ("magnitude", dict(rank="score")),
])
def test_the_default_ranking_is_the_criterions_own(importance, explicit):
    """rank=None resolves per criterion: OBA ranks residual scores per MAC saved, the others by score. The
    default's plan equals the explicit one's, and differs from the other rule's (so the test can fail)."""
    model, x, _ = wide()
    data = [(torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 4, (16,))) for _ in range(2)]
    kw = dict(macs=0.5, importance=importance, data=data, verify=False)
    if importance == "oba_group":  # on this small net its confidence bound picks the same units either way
        kw["confidence"] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = obafx.report(obafx.compile_prune(model, x, **kw)).plan
        same = obafx.report(obafx.compile_prune(model, x, **kw, **explicit)).plan
        flipped = dict(explicit, rank="score" if explicit["rank"] == "per_mac" else "per_mac")
        other = obafx.report(obafx.compile_prune(model, x, **kw, **flipped)).plan
    assert default == same
    assert default != other


@pytest.mark.parametrize("importance, option, default, other", [
    ("oba", "mode", "residual", "full"), ("oba_group", "mode", "full", "residual"), ("oba_group", "probes", 4, 1),
    ("oba_group", "confidence", 2.0, 0.0)])
def test_the_default_hessian_and_probes_are_the_criterions_own(importance, option, default, other):
    """mode=None, probes=None and confidence=None resolve per criterion: OBA's per-parameter scores use H − G (the
    paper's), the group-exact score uses H, 4 probes and mean + 2 standard errors. The default's plan equals the
    explicit value's and differs from the other value's."""
    torch.manual_seed(0)
    model = SmoothCNN().double().eval()  # smooth activations: H − G is far from H (not so on a small ReLU MLP)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (4,), generator=g))
            for _ in range(2)]
    kw = dict(macs=0.5, importance=importance, data=data, verify=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plans = {v: obafx.report(obafx.compile_prune(model, data[0][0], **kw, **({} if v is None else {option: v}))
                                 ).plan for v in (None, default, other)}
    assert plans[None] == plans[default]
    assert plans[None] != plans[other]


@pytest.mark.parametrize("importance, default_sum", [("oba", "member"), ("taylor", "signed")])
def test_the_default_unit_sum_is_the_criterions_own(importance, default_sum):
    """unit_sum=None resolves per criterion: OBA adds its members' magnitudes (the benchmark's default), the
    others keep the signed sum. The default's plan equals the explicit one's and differs from the other rule's."""
    model, x, _ = wide()
    data = [(torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 4, (16,))) for _ in range(2)]
    kw = dict(macs=0.5, importance=importance, data=data, verify=False)
    other_sum = "abs"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plans = {s: obafx.report(obafx.compile_prune(model, x, **kw, **({} if s is None else dict(unit_sum=s)))).plan
                 for s in (None, default_sum, other_sum)}
    assert plans[None] == plans[default_sum]
    assert plans[None] != plans[other_sum]


@pytest.mark.parametrize("importance, default_train", [("oba", True), ("taylor", False)])
def test_the_default_scoring_mode_is_the_criterions_own(importance, default_train):
    """train=None resolves per criterion: OBA scores with BatchNorm on each batch's statistics, the others in eval
    mode. On a conv -> BatchNorm net (running statistics far from the batches') the default's plan equals the
    explicit mode's and differs from the other mode's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 12, 3), nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 10, 3),
                          nn.BatchNorm2d(10), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4)).double()
    x = torch.randn(16, 3, 8, 8, dtype=torch.float64)
    model(x)
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-2, 2), bn.running_var.uniform_(0.2, 5)
    model.eval()
    data = [(torch.randn(16, 3, 8, 8, dtype=torch.float64), torch.randint(0, 4, (16,))) for _ in range(2)]
    kw = dict(macs=0.5, importance=importance, data=data, verify=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plans = {t: obafx.report(obafx.compile_prune(model, x, **kw, **({} if t is None else dict(train=t)))).plan
                 for t in (None, default_train, not default_train)}
    assert plans[None] == plans[default_train]
    assert plans[None] != plans[not default_train]
