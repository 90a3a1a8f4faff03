"""What OBA's residual score is on the networks the benchmark prunes (issue 12, OBA.md section 4):

- eval mode, bias-free ReLU network with L weight layers (homogeneous of degree L): (H − G)θ = (L − 1)·g, so
  residual OBA is (L − 1) times first-order Taylor, parameter by parameter, to float64 round-off;
- train-mode BatchNorm: a conv row feeding a BatchNorm is scale-invariant, so its Taylor term θ⊙g and its
  residual OBA score are both proportional to BatchNorm's eps.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn

from obafx.passes.channel_graph import analyze
from obafx.passes.coupling import couple
from obafx.passes.criteria import taylor_scores
from obafx.passes.hvp import parameter_scores
from obafx.passes.importance import aggregate
from obafx.passes.trace import trace


class ReluNet(nn.Module):
    """conv -> ReLU -> conv -> ReLU -> max-pool -> linear, no biases: homogeneous of degree 3 in its weights."""

    def __init__(self, bias=False):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1, bias=bias)
        self.c2 = nn.Conv2d(6, 5, 3, padding=1, bias=bias)
        self.fc = nn.Linear(5 * 3 * 3, 4, bias=bias)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(nn.functional.max_pool2d(x, 2).flatten(1))


def data(seed=1, n=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (5,), generator=g))
            for _ in range(n)]


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_eval_mode_residual_is_layers_minus_one_times_taylor_on_a_bias_free_relu_net():
    torch.manual_seed(0)
    model, batches = ReluNet().double().eval(), data()
    residual = parameter_scores(model, batches, mode="residual")
    taylor = taylor_scores(model, batches)
    for name in taylor:
        assert rel(residual[name], 2.0 * taylor[name]) < 1e-12, name
    coupling = couple(analyze(trace(model, batches[0][0])))
    units_r, units_t = aggregate(coupling, residual), aggregate(coupling, taylor)
    assert max(abs(units_r[u] - units_t[u]) for u in units_t) < 1e-12  # the same ranking, unit by unit
    full = parameter_scores(model, batches, mode="full")  # the identity is the residual's alone
    assert max(rel(full[n], 2.0 * taylor[n]) for n in taylor) > 1e-3


def test_the_identity_needs_a_bias_free_net():
    torch.manual_seed(0)
    model, batches = ReluNet(bias=True).double().eval(), data()
    residual, taylor = parameter_scores(model, batches, mode="residual"), taylor_scores(model, batches)
    assert max(rel(residual[n], 2.0 * taylor[n]) for n in taylor) > 1e-3


class ConvBn(nn.Module):
    def __init__(self, eps):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6, eps=eps)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.c1(x))).mean((2, 3)))


def conv_net(eps):
    torch.manual_seed(0)
    return ConvBn(eps).double()


def conv_rows(eps, train=True):
    """Per output row of the conv feeding the BatchNorm: (Taylor θ⊙g, residual θ⊙(H−G)θ) row sums."""
    model, batches = conv_net(eps), data(n=2)
    with torch.no_grad():
        model.bn.running_var.fill_(2.0)  # eval mode: a fixed affine map that eps barely changes
    taylor = taylor_scores(model, batches, train=train)["c1.weight"]
    residual = parameter_scores(model, batches, mode="residual", train=train)["c1.weight"]
    return taylor.sum((1, 2, 3)).numpy(), residual.sum((1, 2, 3)).numpy()


def test_train_mode_scores_of_a_row_feeding_batchnorm_scale_with_eps():
    small, large = conv_rows(1e-7), conv_rows(1e-5)
    for a, b in zip(small, large):  # Taylor, then residual
        assert np.abs(a).min() > 0
        np.testing.assert_allclose(b / a, 100.0, rtol=0.01)
    # the rest of the network does not scale: the classifier's Taylor score barely moves with eps
    fc = [taylor_scores(conv_net(eps), data(n=2), train=True)["fc.weight"] for eps in (1e-7, 1e-5)]
    assert rel(fc[1], fc[0]) < 1e-3


def test_in_eval_mode_the_rows_scores_do_not_scale_with_eps():
    small, large = conv_rows(1e-7, train=False), conv_rows(1e-5, train=False)
    for a, b in zip(small, large):
        np.testing.assert_allclose(b / a, 1.0, rtol=1e-3)
