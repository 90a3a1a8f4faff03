"""Model-zoo CI subset: one small variant of each torchvision family, pruned to half its MACs and verified.

Each model: weights=None, eval, float64 with randomised norms (benchmarks/zoo.py's set-up), the smallest input it
runs on (32x32, else 64x64, else 224x224 and float32 for ViT). ``compile_prune(macs=0.5)`` must keep the output
shape, meet the MACs target within 2%, satisfy the masking oracle (exactly; where a LayerNorm/GroupNorm
normalises over a pruned dim, exactly on a removal that avoids norm-coupled groups), re-trace and run under
torch.jit.trace, and the keep-all plan must be bit-identical (all checked by zoo.run_obafx).

Also here: the analysis runs on the meta "skeletons" trace.py records (no second forward pass); it must find
exactly what an analysis of real values finds, and fall back to a real run where a meta run cannot go.
"""
import importlib.util
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from obafx.passes import record as record_mod
from obafx.passes import trace as trace_mod
from obafx.passes.channel_graph import analyze
from obafx.passes.coupling import couple
from obafx.passes.labels import Plane
from tests.prune_oracles import one_thread

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")


def load_zoo():
    sys.path.insert(0, os.path.abspath(BENCH))  # zoo.py imports its sibling common.py
    spec = importlib.util.spec_from_file_location("zoo_bench", os.path.join(BENCH, "zoo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


zoo = load_zoo()

FAST = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "regnet_x_400mf",
        "shufflenet_v2_x0_5", "squeezenet1_1", "googlenet", "convnext_tiny", "swin_t"]
SLOW = ["resnext50_32x4d", "vgg11_bn", "vit_b_16"]  # minutes each on 2 cores (size, or ViT's fixed 224x224)


def check_model(name):
    with one_thread():
        model, x, _ = zoo.build(name, (32, 64, 224))
        r = zoo.run_obafx(model, x)
    assert r["shape_ok"]
    assert zoo.macs_ok(r["macs_ratio"]), r["macs_ratio"]
    assert r["oracle"] in ("exact", "inexact-norm"), r["masked_error"]
    if r["oracle"] == "inexact-norm":
        assert r["subset"]["ok"] is not False, r["subset"]
    assert r["keep_all_identical"] and r["retrace_ok"] and r["jit_ok"], r
    assert r["params_ratio"] < 1.0
    assert r["status"] == "pass", r["why"]


@pytest.mark.parametrize("name", FAST)
def test_prunes_to_half_the_macs_and_verifies(name):
    check_model(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_prunes_to_half_the_macs_and_verifies_large(name):
    check_model(name)


# ---------------------------------------------------------------- the analysis on recorded meta values

def same_planes(a, b) -> bool:
    if isinstance(a, Plane):
        return isinstance(b, Plane) and a.dims == b.dims and np.array_equal(a.arr, b.arr)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(same_planes(x, y) for x, y in zip(a, b))
    return a == b


def real_values(traced):
    """Node values from a real forward pass (as meta skeletons): what the analysis saw before the meta run."""
    with torch.no_grad():
        return record_mod.real_values(traced.gm, traced.inputs)


def assert_same_facts(traced, values_a, values_b):
    facts = [analyze(trace_mod.Traced(traced.gm, traced.inputs, trace_mod.Recorded(
        trace_mod._fingerprint(traced.gm, traced.inputs), v))) for v in (values_a, values_b)]
    a, b = facts
    assert a.shapes == b.shapes
    assert a.store.barriers == b.store.barriers and a.store.next_label == b.store.next_label
    assert a.planes.keys() == b.planes.keys() and all(same_planes(a.planes[k], b.planes[k]) for k in a.planes)
    ca, cb = couple(a), couple(b)
    assert [(g.units, g.members) for g in ca.groups] == [(g.units, g.members) for g in cb.groups]
    assert all(np.array_equal(ca.slot_units[k], cb.slot_units[k]) for k in ca.slot_units)


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "mobilenet_v3_small", "convnext_tiny", "swin_t"])
def test_meta_values_give_the_facts_real_values_give(name):
    with one_thread():
        model, x, _ = zoo.build(name, (32, 64, 224))
        traced = trace_mod.trace(model, x)
        recorded = traced.recorded_values()
        assert recorded is not None
        assert all(v.is_meta for v in recorded.values() if isinstance(v, torch.Tensor))
        assert_same_facts(traced, recorded, real_values(traced))


class DataDependent(nn.Module):
    """A branch on tensor values and a tensor made on the CPU inside forward: a meta run cannot do either."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.conv(x)
        y = y + torch.arange(8, dtype=y.dtype)  # a CPU tensor (along the width) meets the activations
        return self.fc(y.mean((2, 3))) * (y.sum().item() != 0.5)  # .item(): data-dependent


def test_falls_back_to_a_real_run_where_meta_cannot_go():
    model = DataDependent().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    gm = trace_mod.trace(model, x).gm
    with pytest.raises(Exception):  # the premise: this model does not run on meta tensors
        record_mod.meta_values(gm, (x,))
    traced = trace_mod.trace(model, x)
    assert_same_facts(traced, traced.recorded_values(), real_values(traced))
    assert any(("conv.weight", 0) in g.members for g in couple(analyze(traced)).groups)


def test_recorded_values_are_dropped_when_the_module_changes():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).double().eval()
    x = torch.randn(1, 3, 10, 10, dtype=torch.float64)
    traced = trace_mod.trace(model, x)
    assert traced.recorded_values() is not None
    traced.gm.get_submodule("0").weight = nn.Parameter(torch.randn(6, 3, 3, 3, dtype=torch.float64))
    assert traced.recorded_values() is None  # a parameter's shape changed: analyze runs the module again


def test_wrong_input_is_still_a_config_error():
    from obafx import ConfigError

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 8 * 8, 4)).eval()
    for bad in (torch.randn(1, 4, 10, 10), torch.randn(1, 3, 12, 12), torch.randn(1, 3, 10, 10).double()):
        with pytest.raises(ConfigError, match="does not run on the example input"):
            trace_mod.trace(model, bad)


class CastsItsInput(nn.Module):
    """Takes float64 input into a float32 model: fine for a real run, so fine for trace."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return self.conv(x.float()).relu()


def test_an_input_the_model_casts_itself_is_accepted():
    traced = trace_mod.trace(CastsItsInput().eval(), torch.randn(1, 3, 8, 8, dtype=torch.float64))
    assert analyze(traced).shapes["relu"] == (1, 8, 6, 6)
