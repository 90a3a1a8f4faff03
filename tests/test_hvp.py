"""OBA parameter scores against explicit Hessians (torch.func.hessian) on small float64 models.

The small models and the explicit-Hessian oracle defined here are reused by test_criteria.py and
test_hessian_blocks.py.
"""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, hessian, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

from obafx.passes.errors import ConfigError, ScoreError
from obafx.passes.hvp import parameter_scores, prunable_parameter_names
from obafx.passes.hvp_kernels import _CHOSEN

# ------------------------------------------------------------------------------------------ small models


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 5), nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(torch.tanh(self.fc1(x)))))


class ResBlock(nn.Module):
    """stem, then conv-BN-SiLU-conv plus the skip, GELU, pool, head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.conv1, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2, self.fc = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.Linear(3, 3)

    def forward(self, x):
        h = self.stem(x)
        return self.fc(F.gelu(self.conv2(F.silu(self.bn(self.conv1(h)))) + h).mean((2, 3)))


class Concat(nn.Module):
    """Two branches concatenated on channels, BN (eval), GELU: the branches never meet nonlinearly."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 2, 3), nn.Conv2d(2, 3, 1)
        self.bn, self.fc = nn.BatchNorm2d(5), nn.Linear(5, 3)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)[:, :, 1:-1, 1:-1]], 1)
        return self.fc(F.gelu(self.bn(y)).mean((2, 3)))


class Gate(nn.Module):
    """(a + b) * sigmoid(g): a product, an additive merge, and a layer entering linearly."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.g, self.fc = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.fc((self.a(x) + self.b(x)) * torch.sigmoid(self.g(x)) * 2.0)


class Attention(nn.Module):
    """Hand-written attention (or F.scaled_dot_product_attention): qkv Linear split into 2 heads."""

    def __init__(self, sdpa=False):
        super().__init__()
        self.embed, self.qkv = nn.Linear(3, 4), nn.Linear(4, 12)
        self.proj, self.head, self.sdpa = nn.Linear(4, 4), nn.Linear(4, 3), sdpa

    def forward(self, x):
        b, n = x.shape[0], x.shape[1]
        h = self.embed(x)
        q, k, v = self.qkv(h).reshape(b, n, 3, 2, 2).permute(2, 0, 3, 1, 4)
        if self.sdpa:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = (q @ k.transpose(-2, -1) * 2 ** -0.5).softmax(-1) @ v
        return self.head((self.proj(o.transpose(1, 2).reshape(b, n, 4)) + h).mean(1))


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.attn, self.head = nn.Linear(3, 4), nn.MultiheadAttention(4, 2, batch_first=True), \
            nn.Linear(4, 3)

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.attn(h, h, h)[0].mean(1))


def make(name, seed=0):
    """(float64 model in eval mode with non-trivial BN statistics, input x, targets y)."""
    torch.manual_seed(seed)
    model, shape = {"mlp": (MLP, (6, 4)), "res": (ResBlock, (3, 2, 5, 5)), "cat": (Concat, (3, 2, 5, 5)),
                    "gate": (Gate, (6, 4)), "attn": (Attention, (3, 5, 3)), "mha": (MHA, (3, 5, 3)),
                    "sdpa": (lambda: Attention(sdpa=True), (3, 5, 3))}[name]
    model = model().double().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.3, 0.3)
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, 3, (shape[0],))
    return model, x, y


def explicit(model, x, y, names=None, train=False):
    """(flat θ, H, H − G, unflatten) for the loss cross_entropy(model(x), y), built from full matrices."""
    names = names or prunable_parameter_names(model)
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])

    def unflatten(v):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            out[n], i = v[i:i + s.numel()].reshape(s), i + s.numel()
        return out
    fixed = {n: p.detach() for n, p in params.items() if n not in names}
    fixed.update({n: (None if train and ("running" in n or "num_batches" in n) else b.clone())
                  for n, b in model.named_buffers()})
    was = model.training
    model.train(train)
    try:
        def f(v):
            return functional_call(model, {**fixed, **unflatten(v)}, (x,))
        with sdpa_kernel([SDPBackend.MATH]):  # the CPU flash-attention kernel has no forward-mode AD
            H = hessian(lambda v: F.cross_entropy(f(v), y))(flat)
            out = f(flat).detach()
            J = jacrev(f)(flat).reshape(-1, flat.numel())
        Hl = hessian(lambda o: F.cross_entropy(o.reshape(out.shape), y))(out.reshape(-1))
    finally:
        model.train(was)
    return flat, H, H - J.T @ Hl @ J, unflatten


def assert_close(got, want, rel=1e-10):
    """Every tensor of ``got`` equals ``want`` up to rel × the largest |want| over all of them."""
    assert got.keys() == want.keys()
    scale = max(float(w.abs().max()) for w in want.values())
    assert scale > 0
    for n in want:
        err = float((got[n] - want[n]).abs().max())
        assert err <= rel * scale, f"{n}: {err} > {rel} * {scale}"


def snapshot(model):
    """Bit-exact copy of everything scoring must leave alone."""
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: b.clone() for n, b in model.named_buffers()},
            [m.training for m in model.modules()],
            {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()})


def assert_untouched(model, snap):
    params, buffers, flags, grads = snap
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert [m.training for m in model.modules()] == flags
    for n, p in model.named_parameters():
        assert (p.grad is None) == (grads[n] is None) and (p.grad is None or torch.equal(p.grad, grads[n]))


# ------------------------------------------------------------------------------------------------- tests

ORACLE_MODELS = ["mlp", "res", "cat", "attn", "mha"]


@pytest.mark.parametrize("name", ORACLE_MODELS)
def test_full_scores_equal_theta_times_explicit_hessian_theta(name):
    model, x, y = make(name)
    flat, H, _, unflatten = explicit(model, x, y)
    assert_close(parameter_scores(model, [(x, y)], mode="full"), unflatten(flat * (H @ flat)))


@pytest.mark.parametrize("name", ORACLE_MODELS)
def test_residual_scores_equal_theta_times_explicit_h_minus_ggn_theta(name):
    model, x, y = make(name)
    flat, _, R, unflatten = explicit(model, x, y)
    assert_close(parameter_scores(model, [(x, y)], mode="residual"), unflatten(flat * (R @ flat)))


@pytest.mark.parametrize("mode", ["full", "residual"])
def test_double_backward_fallback_gives_the_same_scores(mode):
    model, x, y = make("res")
    fwd = parameter_scores(model, [(x, y)], mode=mode, _backend="forward_over_reverse")
    assert_close(parameter_scores(model, [(x, y)], mode=mode, _backend="double_backward"), fwd, rel=1e-12)


@pytest.mark.parametrize("mode", ["full", "residual"])
def test_chunking_is_exact(mode):
    model, x, y = make("res")
    x, y = torch.cat([x, x.flip(0) * 0.5]), torch.cat([y, y.flip(0)])  # 6 samples in chunks of 4 and 2
    want = parameter_scores(model, [(x, y)], mode=mode)
    assert_close(parameter_scores(model, [(x, y)], mode=mode, chunk_size=4), want)


def test_scores_are_the_mean_of_per_batch_scores_in_any_order():
    model, x, y = make("mlp")
    batches = [(x[i:i + 2], y[i:i + 2]) for i in range(0, 6, 2)]
    each = [parameter_scores(model, [b]) for b in batches]
    mean = {n: sum(s[n] for s in each) / 3 for n in each[0]}
    assert_close(parameter_scores(model, batches), mean, rel=1e-12)
    assert_close(parameter_scores(model, batches[::-1]), mean, rel=1e-12)


def test_delta_adds_theta_times_gradient():
    model, x, y = make("mlp")
    flat, _, _, unflatten = explicit(model, x, y)
    names = prunable_parameter_names(model)
    params = dict(model.named_parameters())
    g = torch.autograd.grad(F.cross_entropy(model(x), y), [params[n] for n in names])
    base = parameter_scores(model, [(x, y)])
    with_delta = parameter_scores(model, [(x, y)], delta=-2.0)
    assert_close({n: with_delta[n] - base[n] for n in names},
                 {n: -2.0 * params[n].detach() * gi for n, gi in zip(names, g)})
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("train", [False, True])
def test_user_model_is_left_bit_identical(train):
    model, x, y = make("res")
    model.train()
    model.bn.eval()  # a mixed set of flags must come back as it was
    model.fc.weight.grad = torch.full_like(model.fc.weight, 3.0)
    snap = snapshot(model)
    parameter_scores(model, [(x, y)], mode="full", train=train)
    parameter_scores(model, [(x, y)], mode="residual", train=train, _backend="double_backward")
    assert_untouched(model, snap)


def test_train_mode_scores_use_batch_statistics():
    model, x, y = make("res")
    flat, H, R, unflatten = explicit(model, x, y, train=True)
    assert_close(parameter_scores(model, [(x, y)], train=True, mode="full"), unflatten(flat * (H @ flat)))
    assert_close(parameter_scores(model, [(x, y)], train=True, mode="residual"), unflatten(flat * (R @ flat)))
    assert not model.training


def test_sdpa_model_is_scored_and_matches_written_out_attention():
    model, x, y = make("sdpa")
    written = Attention(sdpa=False).double()
    written.load_state_dict(model.state_dict())
    assert_close(parameter_scores(model, [(x, y)]), parameter_scores(written, [(x, y)]))
    assert _CHOSEN[model][False] != ("forward_over_reverse", False)  # the CPU flash kernel has no forward AD
    model32, written32 = copy.deepcopy(model).float(), copy.deepcopy(written).float()
    got = parameter_scores(model32, [(x.float(), y)], mode="residual")  # CPU flash kernel: needs a fallback
    assert_close(got, parameter_scores(written32, [(x.float(), y)], mode="residual"), rel=1e-4)


def test_bare_inputs_are_scored_against_argmax_predictions():
    model, x, _ = make("mlp")
    with pytest.warns(UserWarning, match="argmax"):
        got = parameter_scores(model, [x[:3], x[3:]])
    pred = model(x).argmax(1)
    assert_close(got, parameter_scores(model, [(x[:3], pred[:3]), (x[3:], pred[3:])]), rel=1e-12)
    with pytest.warns(UserWarning):
        assert_close(parameter_scores(model, [(x, None)]), parameter_scores(model, [(x, pred)]), rel=1e-12)


def test_default_prunable_parameters():
    class Zoo(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.ct = nn.Conv1d(2, 2, 1), nn.ConvTranspose2d(2, 2, 2, bias=False)
            self.bn, self.ln, self.fc = nn.BatchNorm1d(2), nn.LayerNorm(2), nn.Linear(2, 2)
            self.mha = nn.MultiheadAttention(4, 2, kdim=3, vdim=3)  # separate q/k/v projection weights
    names = prunable_parameter_names(Zoo())
    assert names == ["c1.weight", "c1.bias", "ct.weight", "fc.weight", "fc.bias", "mha.q_proj_weight",
                     "mha.k_proj_weight", "mha.v_proj_weight", "mha.in_proj_bias", "mha.out_proj.weight",
                     "mha.out_proj.bias"]


def test_explicit_params_and_float32():
    model, x, y = make("mlp")
    only = parameter_scores(model, [(x, y)], params=["fc2.weight"])
    assert list(only) == ["fc2.weight"]
    model32 = copy.deepcopy(model).float()
    got = parameter_scores(model32, [(x.float(), y)], progress=True)
    assert all(v.dtype == torch.float32 for v in got.values())
    assert_close(got, {n: v.float() for n, v in parameter_scores(model, [(x, y)]).items()}, rel=1e-4)


def test_bad_inputs_raise_obafx_errors():
    model, x, y = make("mlp")
    with pytest.raises(ScoreError, match="not a scalar"):
        parameter_scores(model, [(x, y)], loss_fn=lambda o, t: F.cross_entropy(o, t, reduction="none"))
    with pytest.raises(ScoreError, match="fc1.weight"):
        parameter_scores(model, [(x * float("nan"), y)])
    with pytest.raises(ConfigError, match="float32"):
        parameter_scores(copy.deepcopy(model).half(), [(x.half(), y)])
    with pytest.raises(ConfigError, match="device"):
        parameter_scores(model, [(x.to("meta"), y)])
    with pytest.raises(ConfigError, match="cast"):
        parameter_scores(model, [(x.float(), y)])
    with pytest.raises(ConfigError, match="named_parameters"):
        parameter_scores(model, [(x, y)], params=["nope"])
    with pytest.raises(ConfigError, match="mode"):
        parameter_scores(model, [(x, y)], mode="diag")
    with pytest.raises(ScoreError, match="empty"):
        parameter_scores(model, [])
    bn_model, bx, by = make("res")
    with pytest.raises(ConfigError, match="BatchNorm"):
        parameter_scores(bn_model, [(bx, by)], train=True, chunk_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # labelled batches never warn
        parameter_scores(model, [(x, y)])


def test_a_backend_that_fails_is_skipped_without_printing(capfd):
    """The CPU flash-attention kernel has no forward-mode AD, so scoring falls back to another backend. fx prints
    a traceback to stderr whenever a GraphModule's code raises; none of that reaches the user."""
    model, x, y = make("sdpa")
    traced = torch.fx.symbolic_trace(model)
    capfd.readouterr()
    scores = parameter_scores(traced, [(x, y)])
    err = capfd.readouterr().err
    assert "Traceback" not in err and "eval_with_key" not in err, err
    assert _CHOSEN[traced][False] != ("forward_over_reverse", False)  # the first backend did fail here
    assert all(torch.isfinite(s).all() for s in scores.values())
