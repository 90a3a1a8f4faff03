"""Bad input gets an obafx error (a subclass of obafx.ObafxError) that names what is wrong and what to do.

Each test asserts the error type and key words of the message. Cases that raise something else today are marked
xfail(strict=True) with the file that must change: when that file is fixed, the XPASS fails the suite so the
marker gets removed.
"""
import inspect
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import obafx
from obafx import BudgetError, ConfigError, ObafxError, ScoreError, TraceError


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tests/conftest.py


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Branchy(nn.Module):
    """Data-dependent control flow in the model's own forward."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            h = h * 2
        return self.b(torch.relu(h))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class GatedMLP(nn.Module):
    """The data-dependent branch lives in a submodule: leaf_modules= makes it traceable."""

    def __init__(self):
        super().__init__()
        self.a, self.gate, self.b, self.c = nn.Linear(4, 8), Gate(), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(self.gate(self.a(x)))))


X = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 0, 1])


def prune(model=None, x=X, no_budget=False, **kw):
    """compile_prune with channels=0.3 unless a budget is given (or no_budget asks for none)."""
    if not no_budget and "macs" not in kw and "channels" not in kw:
        kw["channels"] = 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return obafx.compile_prune(model if model is not None else MLP(), x, **kw)


def line_of(fn, text: str) -> int:
    """The file line number of the first line of ``fn``'s source containing ``text``."""
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, ln in enumerate(lines) if text in ln)


def test_errors_share_one_base():
    for cls in (TraceError, ConfigError, BudgetError, ScoreError, obafx.PlanError):
        assert issubclass(cls, ObafxError)


@pytest.mark.parametrize("cls,fn", [(Branchy, Branchy.forward), (GatedMLP, Gate.forward)])
def test_untraceable_model_names_the_users_line_and_suggests_leaf_modules(cls, fn):
    with pytest.raises(TraceError) as info:
        prune(cls())
    msg = str(info.value)
    assert f'{__file__}", line {line_of(fn, "if x.sum()" if cls is GatedMLP else "if h.sum()")}' in msg
    assert "leaf_modules" in msg and "What to do" in msg


@pytest.mark.parametrize("leaf", [Gate, "gate"])
def test_leaf_modules_make_it_traceable(leaf):
    pruned = prune(GatedMLP(), leaf_modules=[leaf])
    rep = obafx.report(pruned)
    assert rep.params_after < rep.params_before
    assert torch.allclose(pruned(X), pruned(X))  # it runs; the gate is kept as one opaque call
    assert "gate" in [n.target for n in pruned.graph.nodes if n.op == "call_module"]


@pytest.mark.parametrize("x,words", [
    (torch.randn(5, 6), ["does not run on the example input", "(5, 6)", "What to do"]),
    (X.double(), ["does not run on the example input", "dtype", "What to do"]),
    ("a string", ["example_input must be a tensor", "str"]),
    ((), ["non-empty tuple"]),
    ({"x": X}, ["example_input must be a tensor", "dict"]),
])
def test_wrong_example_input_is_a_config_error(x, words):
    with pytest.raises(ConfigError) as info:
        prune(x=x)
    for w in words:
        assert w in str(info.value)


class FlattensTooEarly(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(10, 2)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def test_example_input_that_does_not_fit_names_the_node_and_the_users_line():
    """The failing node, its op and the user's source line; not fx's graph dump."""
    with pytest.raises(ConfigError) as info:
        prune(FlattensTooEarly(), x=torch.randn(1, 3, 8, 8))
    msg = str(info.value)
    line = line_of(FlattensTooEarly.forward, "self.fc(")
    assert "node 'fc' (call_module fc)" in msg and f'{__file__}", line {line}, in forward' in msg
    assert "mat1 and mat2" in msg and "What to do" in msg
    assert "While executing" not in msg and "tlparse" not in msg


@pytest.mark.parametrize("budget,words", [
    (dict(macs=0), ["macs=0", "(0, 1]"]), (dict(macs=1.5), ["macs=1.5", "(0, 1]"]),
    (dict(channels=-0.1), ["channels=-0.1", "(0, 1]"]), (dict(channels=0), ["channels=0", "(0, 1]"]),
    (dict(macs=float("nan")), ["macs=nan"]),
    (dict(macs=0.5, channels=0.5), ["exactly one budget"]), (dict(no_budget=True), ["exactly one budget"]),
    (dict(channels=0.3, round_to=0), ["round_to"]), (dict(channels=0.3, max_layer_ratio=1.0), ["max_layer_ratio"]),
    (dict(channels=0.3, keep_narrow=True), ["keep_narrow=True", "round_to"]),
    (dict(channels=0.3, round_to=8, keep_narrow="yes"), ["keep_narrow='yes'", "bool"]),
])
def test_budget_outside_range_is_a_config_error(budget, words):
    with pytest.raises(ConfigError) as info:
        prune(**budget)
    for w in words:
        assert w in str(info.value)


def test_budget_of_wrong_type_is_a_config_error():
    with pytest.raises(ConfigError, match="macs"):
        prune(macs="0.5")


def test_budget_that_cannot_be_met_is_a_budget_error():
    with pytest.raises(BudgetError) as info:
        prune(macs=0.001)
    msg = str(info.value)
    assert "cannot be met" in msg and "target" in msg and "What to do" in msg


def test_ignore_matching_nothing_lists_valid_names():
    with pytest.raises(ConfigError) as info:
        prune(ignore=["a", "nope"])
    msg = str(info.value)
    assert "nope" in msg and "'a'" in msg and "'b'" in msg and "named_modules" in msg


def test_ignore_given_as_a_string_is_one_name():
    with pytest.raises(ConfigError, match="ab"):
        prune(ignore="ab")


@pytest.mark.parametrize("model", [nn.ReLU(), nn.Linear(4, 3)], ids=["relu-only", "single-linear"])
def test_no_prunable_layer_with_a_macs_budget(model):
    with pytest.raises(BudgetError, match="no prunable channels"):
        prune(model, macs=0.5)


@pytest.mark.parametrize("model", [nn.ReLU(), nn.Linear(4, 3)], ids=["relu-only", "single-linear"])
def test_no_prunable_layer_with_a_channels_budget(model):
    with pytest.raises((BudgetError, ConfigError), match="no prunable"):
        prune(model, channels=0.5)


@pytest.mark.parametrize("steps", [0, -1])
def test_steps_must_be_positive(steps):
    with pytest.raises(ConfigError, match="steps"):
        prune(steps=steps)


def test_leaf_modules_matching_nothing_is_a_config_error():
    with pytest.raises(ConfigError, match="nope"):
        prune(leaf_modules=["nope"])


def test_unknown_importance_lists_the_known_ones():
    with pytest.raises(ConfigError) as info:
        prune(importance="nope")
    assert "nope" in str(info.value) and "magnitude" in str(info.value) and "oba" in str(info.value)


# ------------------------------------------------------------------------------------- calibration and scores

def oba(**kw):
    return prune(importance="oba", **kw)


def test_calibration_batch_of_wrong_shape():
    with pytest.raises((ScoreError, ConfigError)) as info:
        oba(data=[(torch.randn(5, 7), Y)])
    assert "What to do" in str(info.value)


@pytest.mark.parametrize("targets", [torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 7, 0, 1])],
                         ids=["wrong-batch", "label-out-of-range"])
def test_targets_that_do_not_fit_the_output(targets):
    with pytest.raises(ObafxError, match="What to do"):
        oba(data=[(X, targets)])


def test_loss_that_is_not_a_scalar():
    with pytest.raises(ScoreError) as info:
        oba(data=[(X, Y)], loss_fn=lambda out, t: F.cross_entropy(out, t, reduction="none"))
    assert "not a scalar" in str(info.value) and "reduction='mean'" in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_calibration_data(bad):
    x = X.clone()
    x[0, 0] = bad
    with pytest.raises(ScoreError) as info:
        oba(data=[(x, Y)])
    assert "NaN or inf" in str(info.value) and "What to do" in str(info.value)


def test_nan_weights_under_magnitude():
    model = MLP()
    with torch.no_grad():
        model.a.weight[0, 0] = float("nan")
    with pytest.raises(ScoreError, match="NaN/inf"):
        prune(model)


@pytest.mark.parametrize("criterion", [lambda m, c, ctx: {u: float("nan") for g in c.groups for u in g.units},
                                       lambda m, c, ctx: 5], ids=["nan", "not-a-dict"])
def test_custom_criterion_results_are_checked(criterion):
    with pytest.raises(ScoreError):
        prune(importance=criterion)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_refused(dtype):
    with pytest.raises(ConfigError) as info:
        prune(MLP().to(dtype), X.to(dtype))
    assert str(dtype) in str(info.value) and "float32" in str(info.value)


def test_example_input_on_another_device():
    with pytest.raises(ConfigError) as info:
        prune(x=X.to("meta"))
    assert "meta" in str(info.value) and "device" in str(info.value)


def test_calibration_data_on_another_device():
    with pytest.raises(ConfigError) as info:
        oba(data=[(X.to("meta"), Y.to("meta"))])
    assert "meta" in str(info.value) and "device" in str(info.value)


def test_empty_calibration_data():
    with pytest.raises(ConfigError, match="empty"):
        oba(data=[])


def test_not_a_module():
    with pytest.raises(ConfigError, match="nn.Module"):
        prune(lambda t: t)


def test_leaf_modules_entry_that_is_neither_a_name_nor_a_class():
    with pytest.raises(ConfigError, match="leaf_modules entry 3"):
        prune(leaf_modules=[3])
