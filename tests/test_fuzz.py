"""Property-based fuzzing: on random valid architectures (tests/arch_strategy.py), compile_prune either returns a
model that passes every oracle or raises an obafx error that says what to do - never another exception, never a
wrong output.

Oracles (``check_case``, shared with benchmarks/fuzz.py):
  keep-all identity: the low-level rewrite with nothing removed is bit-identical to the traced model and the model;
  masking: the pruned output equals the original run with the removed units zeroed (float64, relative error
    < 1e-9) on the example input and on a batch of another size, wherever no GroupNorm/LayerNorm mixes channels;
  plan: the report's plan maps back onto units of a fresh analysis (removed_from_plan), keeps >= 1 index per dim;
  parameter arithmetic: every parameter and buffer has the shape the plan predicts; counts match the report;
  re-trace: the pruned module traces and analyses again and gives the same output;
  MACs: thop on the pruned module equals the report; a macs budget is met within fit.TOLERANCE on both sides, or
    a note in the report says why it was missed (and the result is then not above the target's band); a channels
    budget never removes more units than asked (plus one per step for rounding);
  save/load: the file rebuilds a bit-identical module from a differently initialised model, and re-applying the
    plan to the original (weights=False) reproduces the pruned state_dict exactly.
"""
from __future__ import annotations

import os
import tempfile
import traceback
import warnings
from typing import Any, Dict, Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import obafx
from obafx.io import load, save
from obafx.passes.channel_graph import analyze
from obafx.passes.coupling import couple
from obafx.passes.errors import ObafxError, PlanError
from obafx.passes.facts import PrunePlan
from obafx.passes.fit import MISSED, TOLERANCE
from obafx.passes.macs import thop_macs
from obafx.passes.plan import removed_from_plan
from obafx.passes.rewrite import rewrite
from obafx.passes.trace import trace
from obafx.passes.verify import masked_output

try:
    from arch_strategy import build, cases, describe, example_input, mixes_channels
    from prune_oracles import relative_error
except ImportError:  # imported as tests.test_fuzz
    from tests.arch_strategy import build, cases, describe, example_input, mixes_channels
    from tests.prune_oracles import relative_error

MASK_TOL = 1e-9
MAC_TOL = TOLERANCE  # the one stated budget tolerance (relative, both sides)


class OracleFailure(AssertionError):
    """An oracle disagreed: ``oracle`` names which one."""

    def __init__(self, oracle: str, detail: str):
        super().__init__(f"{oracle}: {detail}")
        self.oracle = oracle


def expect(ok: bool, oracle: str, detail: str = "") -> None:
    if not ok:
        raise OracleFailure(oracle, detail)


def check_case(case: Dict[str, Any]) -> Dict[str, Any]:
    """Run one fuzz case. Out: {"outcome": "verified" | "refused" | "failed", "kind": oracle or error type,
    "detail": message, "budget": "met" | "noted" for a verified macs budget, else None}. Refusals must be obafx errors that say what to do; anything else is a failure."""
    spec, seed = case["spec"], case["seed"]
    model, x = build(spec, seed), example_input(spec, seed + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = _keep_all(model, x)
            pruned = _compile(case, model, x)
            if isinstance(pruned, PlanError):  # no plan was given: compile_prune contradicted itself
                return _outcome("failed", "internal PlanError", f"PlanError: {pruned}")
            if isinstance(pruned, ObafxError):
                clear = "What to do" in str(pruned)
                return _outcome("refused" if clear else "failed", type(pruned).__name__ if clear else "unclear refusal",
                                f"{type(pruned).__name__}: {pruned}")
            budget = _oracles(case, model, x, ref, pruned)
    except OracleFailure as exc:
        return _outcome("failed", exc.oracle, str(exc))
    except Exception as exc:  # anything else is a bug: record it with its traceback
        return _outcome("failed", f"crash:{type(exc).__name__}", "".join(traceback.format_exception(exc))[-3000:])
    return _outcome("verified", "", "", budget)


def _outcome(outcome: str, kind: str, detail: str, budget: Optional[str] = None) -> Dict[str, Any]:
    return {"outcome": outcome, "kind": kind, "detail": detail, "budget": budget}


def _keep_all(model, x) -> Dict[str, Any]:
    """Trace, analyse, couple; the keep-all rewrite must be bit-identical. Returns the analysis for later oracles."""
    traced = trace(model, x)
    facts = analyze(traced)
    coupling = couple(facts)
    same = rewrite(traced, coupling, facts.shapes, set())
    with torch.no_grad():
        y = model(x)
        expect(torch.equal(traced.gm(x), y), "keep-all identity", "traced module differs from the model")
        expect(torch.equal(same(x), y), "keep-all identity", "keep-all rewrite differs from the model")
    return {"traced": traced, "coupling": coupling}


def _compile(case, model, x):
    """compile_prune on the case; an obafx error is returned (a refusal), anything else propagates."""
    data = None
    if case["importance"] == "oba":
        gen = torch.Generator().manual_seed(case["seed"] + 2)
        xs = torch.randn((4,) + tuple(x.shape[1:]), generator=gen, dtype=x.dtype)
        data = [(xs, torch.randint(0, case["spec"]["classes"], (4,), generator=gen))]
    try:
        # recalibrate=False: BatchNorm statistics re-estimated after pruning are a second, deliberate change of
        # the function, which the masking oracle (pruned == original with removed units zeroed) cannot follow
        return obafx.compile_prune(model, x, importance=case["importance"], data=data, steps=case["steps"],
                                   seed=case["seed"], recalibrate=False, **case["budget"])
    except ObafxError as exc:
        return exc


def _oracles(case, model, x, ref, pruned) -> Optional[str]:
    rep = obafx.report(pruned)
    traced, coupling = ref["traced"], ref["coupling"]
    plan = PrunePlan.from_dict(rep.plan)
    expect(all(len(idx) > 0 and list(idx) == sorted(set(idx)) for dims in plan.kept.values() for idx in dims.values()),
           "plan", f"a kept-index list is empty, unsorted or repeated: {rep.plan}")
    removed = removed_from_plan(coupling, plan)
    with torch.no_grad():
        out = pruned(x)
        if not mixes_channels(case["spec"]):
            x3 = torch.randn((3,) + tuple(x.shape[1:]), dtype=x.dtype, generator=torch.Generator().manual_seed(5))
            for inp, y in ((x, out), (x3, pruned(x3))):
                err = relative_error(masked_output(traced, coupling, removed, inputs=(inp,)), y)
                expect(err < MASK_TOL, "masking", f"relative error {err:.3g} on batch {inp.shape[0]}")
    _param_arithmetic(traced.gm, pruned, plan, rep)
    again = trace(pruned, x)
    couple(analyze(again))
    with torch.no_grad():
        expect(torch.equal(again.gm(x), out), "re-trace", "the re-traced pruned module gives another output")
    budget = _macs(case, pruned, x, rep, coupling, removed)
    _save_load(case, model, pruned, x, out)
    return budget


def _param_arithmetic(original, pruned, plan: PrunePlan, rep) -> None:
    tensors = dict(original.named_parameters())
    tensors.update(dict(original.named_buffers()))
    now = dict(pruned.named_parameters())
    now.update(dict(pruned.named_buffers()))
    expect(now.keys() == tensors.keys(), "parameter arithmetic",
           f"names changed: {sorted(now.keys() ^ tensors.keys())}")
    for name, t in tensors.items():
        dims = plan.kept.get(name, {})
        want = tuple(len(dims[d]) if d in dims else s for d, s in enumerate(t.shape))
        expect(tuple(now[name].shape) == want, "parameter arithmetic", f"{name}: shape {tuple(now[name].shape)}, "
               f"plan predicts {want}")
    count = sum(p.numel() for p in pruned.parameters())
    expect(count == rep.params_after, "parameter arithmetic", f"{count} parameters, report says {rep.params_after}")


def _macs(case, pruned, x, rep, coupling, removed) -> Optional[str]:
    """The MAC oracles; returns "met" or "noted" for a macs budget (within the tolerance, or missed with a note),
    None for a channels budget."""
    measured, _ = thop_macs(pruned, (x,))
    expect(measured == rep.macs_after, "MACs", f"thop counts {measured}, report says {rep.macs_after}")
    kind, value = next(iter(case["budget"].items()))
    if kind == "macs":
        target = value * rep.macs_before
        said = any(MISSED in note for note in rep.notes)  # a miss compile_prune noted (and warned about)
        met = abs(rep.macs_after - target) <= target * MAC_TOL + 1e-6
        expect(met or said, "MACs",
               f"kept {rep.macs_after / rep.macs_before:.4f} of the MACs, asked for {value:.4f}, and no note says so")
        return "met" if met else "noted"
    else:
        units = sum(g.width for g in coupling.groups)
        expect(len(removed) <= round(value * units) + case["steps"], "channels",
               f"removed {len(removed)} of {units} units, asked for {value:.3f}")
        return None


def _save_load(case, model, pruned, x, out) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = save(pruned, os.path.join(tmp, "m.safetensors"), example_input=x)
        loaded = load(path, lambda: build(case["spec"], case["seed"] + 7))
        with torch.no_grad():
            expect(torch.equal(loaded(x), out), "save/load", "the loaded module gives another output")
        again = load(path, model, weights=False)
    a, b = again.state_dict(), pruned.state_dict()
    expect(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "save/load",
           "re-applying the saved plan to the original model does not reproduce the pruned state_dict")


# ------------------------------------------------------------------------------------------------ pytest

pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tests/conftest.py


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
def test_compile_prune_verifies_or_refuses_clearly(case):
    result = check_case(case)
    assert result["outcome"] != "failed", f"{result['kind']} on {describe(case['spec'])}:\n{result['detail']}\n{case}"
