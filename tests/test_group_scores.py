"""importance="oba_group": the group-exact loss change ΔL_u = −g_uᵀθ_u + ½ θ_uᵀM_uuθ_u against explicit
Hessians (torch.func.hessian) on float64 nets small enough to write H and G out."""
import itertools
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jacrev

import obafx
from obafx.passes.channel_graph import analyze
from obafx.passes.coupling import couple
from obafx.passes.group_scores import group_scores, unit_order
from obafx.passes.trace import trace
from tests.small_nets import SmoothCNN


class TinyBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b, self.c = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.bn(self.a(x))))))


class SquareResidual(nn.Module):
    """x + l(x): l's weight has the same unit on both dims along its diagonal (one entry, one unit, counted once)."""

    def __init__(self):
        super().__init__()
        self.a, self.l, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        x = self.a(x)
        return self.c(torch.tanh(x + torch.tanh(self.l(x))))


def setup(net=TinyBn):
    torch.manual_seed(0)
    model = net().double().eval()
    if net is SquareResidual:
        x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
        return model, couple(analyze(trace(model, x))), x, y
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.normal_()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    return model, couple(analyze(trace(model, x))), x, y


def unit_masks(model, coupling, names):
    """(n units, P) 0/1: entry e of the flattened parameters belongs to unit u when its index along some slot dim
    of its parameter maps to u (written with loops, independently of the library's index)."""
    units = unit_order(coupling)
    params = dict(model.named_parameters())
    rows = []
    for u in units:
        parts = []
        for n in names:
            m = np.zeros(tuple(params[n].shape))
            for idx in np.ndindex(*m.shape):
                m[idx] = any(int(arr[idx[d]]) == u for (s, d), arr in coupling.slot_units.items() if s == n)
            parts.append(m.reshape(-1))
        rows.append(np.concatenate(parts))
    return torch.tensor(np.array(rows))


def explicit(model, coupling, x, y, mode):
    """(ΔL per unit, C = Θ M Θᵀ with Θ the unit-restricted θ's) from explicit H and G."""
    params = dict(model.named_parameters())
    names = [n for n in params if any(s == n for s, _ in coupling.slot_units)]
    assert {"a.weight", "c.weight"} <= set(names) and ("bn.weight" in names or "l.weight" in names)
    sizes, shapes = [params[n].numel() for n in names], [params[n].shape for n in names]
    fixed = {**{k: v.detach() for k, v in params.items()}, **dict(model.named_buffers())}
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def out(flat):
        parts = [p.reshape(s) for p, s in zip(flat.split(sizes), shapes)]
        return functional_call(model, {**fixed, **dict(zip(names, parts))}, (x,))

    def loss(flat):
        return F.cross_entropy(out(flat), y)
    m, g = hessian(loss)(theta), grad(loss)(theta)
    if mode == "residual":
        jac = jacrev(out)(theta)
        h_out = hessian(lambda o: F.cross_entropy(o, y))(out(theta))
        m = m - torch.einsum("ncp,ncmd,mdq->pq", jac, h_out, jac)
    restricted = unit_masks(model, coupling, names) * theta
    cross = restricted @ m @ restricted.T
    return -(restricted @ g) + 0.5 * torch.diagonal(cross), cross


@pytest.mark.parametrize("net,units", [(TinyBn, 7), (SquareResidual, 4)], ids=["bn", "square"])
@pytest.mark.parametrize("mode", ["full", "residual"])
def test_exhaustive_signs_give_the_explicit_loss_change(mode, net, units):
    model, coupling, x, y = setup(net)
    want, _ = explicit(model, coupling, x, y, mode)
    n = len(unit_order(coupling))
    assert n == units
    patterns = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=n)), dtype=torch.float64)
    got = group_scores(model, coupling, [(x, y)], mode=mode, signs=patterns)
    got = torch.tensor([got[u] for u in unit_order(coupling)], dtype=torch.float64)
    assert want.abs().max() > 1e-3
    assert (got - want).abs().max() < 1e-10, (got, want)


@pytest.mark.parametrize("mode", ["full", "residual"])
def test_random_probes_converge_to_the_explicit_loss_change(mode):
    model, coupling, x, y = setup()
    want, cross = explicit(model, coupling, x, y, mode)
    probes = 600
    got = group_scores(model, coupling, [(x, y)], mode=mode, probes=probes, seed=3)
    got = torch.tensor([got[u] for u in unit_order(coupling)], dtype=torch.float64)
    off = cross - torch.diag(torch.diagonal(cross))
    sigma = 0.5 * (off.pow(2).sum(1) / probes).sqrt()  # std of ½·mean of s_u Σ_w s_w C_uw over the probes
    assert (sigma > 0).all() and sigma.max() > 1e-4  # cross terms exist: one probe alone is not exact
    assert ((got - want).abs() <= 5 * sigma).all(), ((got - want) / sigma)
    # the bound can fail: the quadratic part alone (without the first-order term) is many sigmas away
    assert ((0.5 * torch.diagonal(cross) - want).abs() > 5 * sigma).any()
    one = group_scores(model, coupling, [(x, y)], mode=mode, probes=1, seed=3)
    assert max(abs(one[u] - float(w)) for u, w in zip(unit_order(coupling), want)) > 1e-6


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_compile_prune_with_oba_group(train):
    torch.manual_seed(0)
    model = SmoothCNN().double().eval()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (4,), generator=g))
            for _ in range(4)]
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = obafx.compile_prune(model, data[0][0], macs=0.6, steps=2, importance="oba_group", mode="residual",
                                     data=data, train=train, probes=2, rank="score",
                                     on_stage=lambda name, facts: seen.append(facts) if name == "score" else None)
    rep = obafx.report(pruned)
    assert rep.importance == "oba_group" and rep.macs_ratio <= 0.61 and rep.masked_error < 1e-9
    assert "probes=2, confidence=2" in rep.scored_with  # the default bound, said in the report
    assert len(seen) == 2 and all(max(abs(v) for v in s.values()) == pytest.approx(1.0) for s in seen)


@pytest.mark.parametrize("z", [1.0, 2.5])
def test_confidence_adds_z_standard_errors_of_the_batch_probe_samples(z):
    """Each (batch, probe) sample is −g_uᵀθ_u + ½ s_u Σ_w s_w C_uw, with g and C from explicit float64 Hessians of
    that batch; the score with ``confidence=z`` is their mean plus z standard errors (n−1 variance)."""
    model, coupling, x, y = setup()
    x2, y2 = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    n = len(unit_order(coupling))
    signs = (torch.randint(0, 2, (5, n), generator=torch.Generator().manual_seed(7)) * 2 - 1).double()
    samples = []
    for xb, yb in ((x, y), (x2, y2)):
        want, cross = explicit(model, coupling, xb, yb, "full")
        first = want - 0.5 * torch.diagonal(cross)
        samples += [first + 0.5 * s * (cross @ s) for s in signs]
    samples = torch.stack(samples)
    bound = samples.mean(0) + z * samples.std(0, unbiased=True) / len(samples) ** 0.5
    got = group_scores(model, coupling, [(x, y), (x2, y2)], mode="full", signs=signs, confidence=z)
    plain = group_scores(model, coupling, [(x, y), (x2, y2)], mode="full", signs=signs)
    got = torch.tensor([got[u] for u in unit_order(coupling)], dtype=torch.float64)
    plain = torch.tensor([plain[u] for u in unit_order(coupling)], dtype=torch.float64)
    assert (got - bound).abs().max() < 1e-10, (got, bound)
    assert (plain - samples.mean(0)).abs().max() < 1e-10
    assert (got - plain).min() > 1e-6  # the samples disagree: the bound sits above every mean


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "1", True])
def test_a_bad_confidence_is_a_config_error(bad):
    model, coupling, x, y = setup()
    with pytest.raises(obafx.ConfigError, match="confidence="):
        group_scores(model, coupling, [(x, y)], confidence=bad)
    with pytest.raises(obafx.ConfigError, match="confidence="):
        obafx.compile_prune(model, x, macs=0.5, importance="oba_group", data=[(x, y)], confidence=bad)
