"""Nothing lost, nothing altered: after every public call the user's model is exactly as it was.

Checked after compile_prune (magnitude, random, oba, taylor, fisher), report, save, load, parameter_scores and
hessian_blocks, in train and eval mode: the same Parameter and buffer objects with bit-identical values, dtypes and
devices, the same training flag on every module, requires_grad flags, .grad None stays None (and a set .grad keeps
its values), and registered forward hooks / pre-hooks still registered and still firing once per call.
"""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import obafx
from obafx.io import load, save

X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 1])


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tests/conftest.py


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)
        self.drop, self.fc = nn.Dropout(0.3), nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.ones(8, 1, 1))

    def forward(self, x):
        h = F.relu(self.bn(self.c1(x)))
        h = self.c2(h) * self.scale + h
        return self.fc(self.drop(h.mean((2, 3))))


def user_model(training: bool) -> nn.Module:
    """A model as a user holds it: some frozen params, one .grad already set, a submodule left in eval, hooks."""
    torch.manual_seed(0)
    m = Net().train(training)
    m.bn.running_mean.uniform_(-1, 1)
    m.c1.bias.requires_grad_(False)
    m.fc.weight.grad = torch.full_like(m.fc.weight, 0.25)
    if training:
        m.drop.eval()  # mixed flags must survive too
    m.calls = {"root": 0, "pre": 0, "c2": 0}
    m.register_forward_hook(lambda mod, i, o: mod.calls.__setitem__("root", mod.calls["root"] + 1))
    m.register_forward_pre_hook(lambda mod, i: m.calls.__setitem__("pre", m.calls["pre"] + 1))
    m.c2.register_forward_hook(lambda mod, i, o: m.calls.__setitem__("c2", m.calls["c2"] + 1))
    return m


def snapshot(m: nn.Module) -> dict:
    """Everything a call could alter, with references to the live objects and copies of their values."""
    return {
        "params": {n: (p, p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone())
                   for n, p in m.named_parameters()},
        "buffers": {n: (b, b.clone()) for n, b in m.named_buffers()},
        "training": {n: mod.training for n, mod in m.named_modules()},
        "hooks": {n: (list(mod._forward_hooks.values()), list(mod._forward_pre_hooks.values()))
                  for n, mod in m.named_modules()},
    }


def assert_untouched(m: nn.Module, before: dict) -> None:
    now = dict(m.named_parameters())
    assert now.keys() == before["params"].keys()
    for n, (p, value, req, grad) in before["params"].items():
        assert now[n] is p, f"parameter {n} was replaced"
        assert p.dtype == value.dtype and p.device == value.device and torch.equal(p.detach(), value), n
        assert p.requires_grad == req, n
        assert (p.grad is None) == (grad is None) and (grad is None or torch.equal(p.grad, grad)), n
    bufs = dict(m.named_buffers())
    assert bufs.keys() == before["buffers"].keys()
    for n, (b, value) in before["buffers"].items():
        assert bufs[n] is b and b.dtype == value.dtype and torch.equal(b, value), n
    assert {n: mod.training for n, mod in m.named_modules()} == before["training"]
    hooks = {n: (list(mod._forward_hooks.values()), list(mod._forward_pre_hooks.values()))
             for n, mod in m.named_modules()}
    assert hooks == before["hooks"]
    counts = dict(m.calls)
    with torch.no_grad():
        m(X)
    assert m.calls == {k: v + 1 for k, v in counts.items()}, "hooks stopped firing (or fire twice)"


def quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


CRITERIA = {
    "magnitude": {}, "random": {}, "oba": {"data": [(X, Y)]}, "oba_group": {"data": [(X, Y)]},
    "taylor": {"data": [(X, Y)]}, "fisher": {"data": [(X, Y)]},
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("importance", sorted(CRITERIA))
def test_compile_prune_leaves_the_model_untouched(importance, training):
    m = user_model(training)
    before = snapshot(m)
    pruned = quiet(obafx.compile_prune, m, X, channels=0.4, importance=importance, **CRITERIA[importance])
    assert obafx.report(pruned).params_after < obafx.report(pruned).params_before
    assert_untouched(m, before)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_iterative_oba_leaves_the_model_untouched(training):
    m = user_model(training)
    before = snapshot(m)
    quiet(obafx.compile_prune, m, X, macs=0.6, steps=2, importance="oba", data=[(X, Y), (X.flip(0), Y)])
    assert_untouched(m, before)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_report_save_and_load_leave_both_modules_untouched(training, tmp_path):
    m = user_model(training)
    pruned = quiet(obafx.compile_prune, m, X, channels=0.4)
    pruned.calls = {"root": 0, "pre": 0, "c2": 0}  # the pruned module carries the submodule hook; count it too
    before_m, before_p = snapshot(m), snapshot(pruned)
    obafx.report(pruned)
    path = save(pruned, tmp_path / "m.safetensors", example_input=X)
    fresh = user_model(training)
    before_fresh = snapshot(fresh)
    loaded = load(path, fresh)
    assert_untouched(m, before_m)
    assert_untouched(fresh, before_fresh)
    # The pruned module too: report and save only read it.
    assert {n: p for n, p in pruned.named_parameters()}.keys() == before_p["params"].keys()
    for n, (p, value, req, _) in before_p["params"].items():
        assert dict(pruned.named_parameters())[n] is p and torch.equal(p.detach(), value) and p.requires_grad == req
    assert {n: mod.training for n, mod in pruned.named_modules()} == before_p["training"]
    assert loaded is not fresh


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_parameter_scores_leave_the_model_untouched(training):
    hvp = pytest.importorskip("obafx.passes.hvp")
    m = user_model(training)
    before = snapshot(m)
    for mode in ("full", "residual"):
        scores = quiet(hvp.parameter_scores, m, [(X, Y)], mode=mode, train=training)
        assert set(scores) and all(torch.isfinite(s).all() for s in scores.values())
    assert_untouched(m, before)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_hessian_blocks_leave_the_model_untouched(training):
    hb = pytest.importorskip("obafx.passes.hessian_blocks")
    m = user_model(training)
    before = snapshot(m)
    blocks = hb.hessian_blocks(m, X)
    assert len(blocks.layers) >= 3
    assert_untouched(m, before)
