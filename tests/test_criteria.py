"""Baseline criteria against explicit computations on small float64 models."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

from obafx.passes.criteria import fisher_scores, magnitude_scores, obd_scores, taylor_scores
from obafx.passes.errors import ConfigError
from obafx.passes.hvp import prunable_parameter_names

sys.path.insert(0, os.path.dirname(__file__))
from test_hvp import assert_close, assert_untouched, explicit, make, snapshot  # noqa: E402


def batches_of(name):
    """Two batches of different sizes (3 and 3 samples of distinct data)."""
    model, x, y = make(name)
    return model, [(x[:3], y[:3]), (x[3:], y[3:])] if x.shape[0] >= 6 else [(x, y), (x.flip(0) * 0.7, y)]


def sample_grads(model, x, y):
    """Per-sample gradients of the prunable parameters, one sample at a time (plain Python loop)."""
    names = prunable_parameter_names(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(theta, xi, yi):
        return F.cross_entropy(functional_call(model, {**params, **buffers, **theta}, (xi,)), yi)
    return [grad(loss)({n: params[n] for n in names}, x[i:i + 1], y[i:i + 1]) for i in range(x.shape[0])]


@pytest.mark.parametrize("name", ["mlp", "res"])
def test_taylor_is_theta_times_mean_gradient(name):
    model, batches = batches_of(name)
    grads = [sample_grads(model, x, y) for x, y in batches]  # mean of per-sample grads = batch gradient
    theta = {n: p.detach() for n, p in model.named_parameters()}
    want = {n: theta[n] * sum(sum(g[n] for g in gs) / len(gs) for gs in grads) / len(grads) for n in grads[0][0]}
    assert_close(taylor_scores(model, batches), want)


@pytest.mark.parametrize("name", ["mlp", "res"])
def test_fisher_is_the_mean_of_squared_per_sample_gradients(name):
    model, batches = batches_of(name)
    theta = {n: p.detach() for n, p in model.named_parameters()}
    per_batch = [sample_grads(model, x, y) for x, y in batches]
    want = {n: 0.5 * theta[n] ** 2 * sum(sum(g[n] ** 2 for g in gs) / len(gs) for gs in per_batch) / 2
            for n in per_batch[0][0]}
    assert_close(fisher_scores(model, batches), want)
    assert_close(fisher_scores(model, batches, chunk_size=2), want)


def test_obd_exact_is_half_theta_squared_times_explicit_hessian_diagonal():
    model, batches = batches_of("mlp")
    diags, unflatten = [], None
    for x, y in batches:
        flat, H, _, unflatten = explicit(model, x, y)
        diags.append(torch.diagonal(H))
    want = unflatten(0.5 * flat ** 2 * (diags[0] + diags[1]) / 2)
    assert_close(obd_scores(model, batches, diagonal="exact"), want)


def test_hutchinson_is_within_its_standard_error_of_the_exact_diagonal():
    model, x, y = make("mlp")
    flat, H, _, unflatten = explicit(model, x, y)
    samples = 100
    # Var[z_i (Hz)_i] = sum_{j != i} H_ij^2 for Rademacher z.
    sigma = ((H ** 2).sum(1) - torch.diagonal(H) ** 2).sqrt() / samples ** 0.5
    got = obd_scores(model, [(x, y)], samples=samples, seed=1)
    est = torch.cat([(got[n] / (0.5 * p.detach() ** 2)).reshape(-1) for n, p in
                     ((n, dict(model.named_parameters())[n]) for n in prunable_parameter_names(model))])
    assert ((est - torch.diagonal(H)).abs() <= 5 * sigma + 1e-12).all()
    assert ((est - torch.diagonal(H)).abs() <= 2 * sigma + 1e-12).float().mean() > 0.9
    again = obd_scores(model, [(x, y)], samples=samples, seed=1)
    assert all(torch.equal(got[n], again[n]) for n in got)
    other = obd_scores(model, [(x, y)], samples=4, seed=2)
    assert any(not torch.allclose(got[n], other[n]) for n in got)


def test_magnitude_is_theta_squared():
    model, _, _ = make("res")
    got = magnitude_scores(model)
    assert list(got) == prunable_parameter_names(model)
    assert all(torch.equal(got[n], dict(model.named_parameters())[n].detach() ** 2) for n in got)


def test_criteria_leave_the_model_untouched_and_refuse_bad_settings():
    model, batches = batches_of("res")
    model.train()
    snap = snapshot(model)
    taylor_scores(model, batches, train=True)
    obd_scores(model, batches, samples=2, train=True)
    fisher_scores(model, batches)
    assert_untouched(model, snap)
    with pytest.raises(ConfigError, match="hutchinson"):
        obd_scores(model, batches, diagonal="exact", max_exact_numel=10)
    with pytest.raises(ConfigError, match="BatchNorm"):
        fisher_scores(model, batches, train=True)
    with pytest.raises(ConfigError, match="diagonal"):
        obd_scores(model, batches, diagonal="full")
