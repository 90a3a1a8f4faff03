"""The torch.export capture path (passes/capture.py), the aten half of the op table (ops.py, rules_aten.py) and
the MAC counters (thop, FlopCounterMode) on models small enough to check by hand."""
import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import obafx
from obafx import BudgetError, ConfigError, TraceError
from obafx.passes import ops
from obafx.passes.capture import capture
from obafx.passes.channel_graph import analyze
from obafx.passes.coupling import couple

pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tests/conftest.py
aten = torch.ops.aten


def flops(model, x):
    """FLOPs by FlopCounterMode, autograd on (nn.MultiheadAttention's no-grad fast path hides its matmuls)."""
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def test_aten_overloads_share_the_rules_of_their_torch_level_twins():
    rules = ops.FUNCTIONS  # whole entries: the twin's rule and its rewrite fixes
    assert rules[aten.linear.default] is rules[F.linear] and rules[aten.conv2d.default] is rules[F.conv2d]
    assert rules[aten.layer_norm.default] is rules[F.layer_norm]
    assert rules[aten.scaled_dot_product_attention.default] is rules[F.scaled_dot_product_attention]
    assert rules[aten.view.default] is ops.METHODS["view"] and rules[aten.cat.default] is rules[torch.cat]
    assert ops.rule_for("call_function", aten.cumsum.default) is None  # unknown overloads stay barriers


def test_export_capture_finds_the_groups_of_the_fx_capture():
    model, x = torchvision.models.resnet18(num_classes=10).eval(), torch.randn(2, 3, 32, 32)
    widths = {}
    for how in ("fx", "export"):
        traced = capture(model, x, how=how)
        assert traced.gm.meta["obafx_capture"] == how
        widths[how] = sorted(g.width for g in couple(analyze(traced)).groups)
    assert widths["export"] == widths["fx"] and len(widths["fx"]) == 12


class CumsumOverChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), dim=-1))


def test_an_aten_op_outside_the_table_is_a_barrier_with_the_users_line():
    facts = analyze(capture(CumsumOverChannels(), torch.randn(2, 4), how="export"))
    assert not couple(facts).groups
    (node, why), = facts.store.barriers
    assert "cumsum" in why


class ShapeBranch(nn.Module):
    """Branches on a shape: torch.fx cannot trace it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        if h.shape[-1] > 4:
            h = torch.relu(h)
        return self.b(h)


def test_auto_capture_falls_back_to_export_and_the_result_runs_at_other_batch_sizes():
    model, x = ShapeBranch().eval(), torch.randn(2, 4)
    pruned = obafx.compile_prune(model, x, channels=0.5)
    rep = obafx.report(pruned)
    assert rep.capture == "export" and rep.counter == "flops" and rep.masked_error < 1e-6
    assert set(rep.plan) == {"a.weight", "a.bias", "b.weight"}  # the user's parameter names
    assert pruned.a.weight.shape == (4, 4)
    assert pruned(torch.randn(7, 4)).shape == (7, 3)


def test_export_says_that_it_fixes_size_one_dims():
    with pytest.warns(UserWarning, match=r"dims of size 1 \(input, dim: \[\(0, 0\)\]\)"):
        pruned = obafx.compile_prune(ShapeBranch().eval(), torch.randn(1, 4), channels=0.5)
    assert pruned(torch.randn(1, 4)).shape == (1, 3)


class DataBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            h = h * 2
        return h


def test_a_model_no_path_captures_gets_a_trace_error_naming_both_paths_and_the_line():
    with pytest.raises(TraceError) as info:
        obafx.compile_prune(DataBranch(), torch.randn(2, 4), channels=0.5)
    msg = str(info.value)
    line = inspect.getsourcelines(DataBranch.forward)[1] + 2
    assert "torch.fx could not trace" in msg and "torch.export (non-strict) could not capture" in msg
    assert msg.count(f'{__file__}", line {line}') == 2 and "What to do" in msg


def test_capture_and_counter_options_are_checked():
    with pytest.raises(ConfigError, match="capture='onnx'"):
        obafx.compile_prune(ShapeBranch(), torch.randn(2, 4), channels=0.5, capture="onnx")
    with pytest.raises(ConfigError, match="counter='fvcore'"):
        obafx.compile_prune(ShapeBranch(), torch.randn(2, 4), macs=0.5, counter="fvcore")


class FunctionalMLP(nn.Module):
    """F.linear on the layers' weights, the layers never called: thop's module hooks see no compute."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(8, 16, bias=False), nn.Linear(16, 4, bias=False)

    def forward(self, x):
        return F.linear(torch.relu(F.linear(x, self.l1.weight)), self.l2.weight)


def test_a_mac_budget_the_counter_cannot_see_is_an_error_and_flops_counts_it():
    x = torch.randn(3, 8)
    with pytest.raises(BudgetError, match="'thop' counter sees no compute.*counter='flops'"):
        obafx.compile_prune(FunctionalMLP(), x, macs=0.5)
    pruned = obafx.compile_prune(FunctionalMLP(), x, macs=0.5, counter="flops")
    assert pruned.l1.weight.shape == (8, 8) and obafx.report(pruned).counter == "flops"


def test_counter_flops_meets_a_vit_budget_with_attention_counted():
    """torchvision's ViT (nn.MultiheadAttention): thop misses the attention matmuls, FlopCounterMode counts them;
    with counter='flops' the budget holds within 2% by FlopCounterMode."""
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=12,
                                               hidden_dim=96, mlp_dim=384, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    pruned = obafx.compile_prune(vit, x, macs=0.5, counter="flops")
    ratio = flops(pruned, x) / flops(vit, x)
    assert abs(ratio - 0.5) <= 0.01, ratio
    assert not obafx.report(pruned).notes
    assert obafx.report(pruned).counter == "flops"
