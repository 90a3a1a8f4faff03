"""Oracles shared by the rule tests (not collected by pytest): prune a model through the low-level API with
random removals and check it against the original (runs, masking, keep-all identity, parameter arithmetic,
re-trace), and check a `compile_prune` result the same way.
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Iterable, Optional, Sequence, Set, Tuple

import numpy as np
import torch
import torch.fx as fx

import obafx
from obafx.passes.channel_graph import analyze
from obafx.passes.coupling import couple
from obafx.passes.plan import plan_from_removed
from obafx.passes.rewrite import rewrite
from obafx.passes.trace import trace
from obafx.passes.verify import masked_output

EXACT = 1e-9


@contextlib.contextmanager
def one_thread():
    """Tiny float64 models run far faster on one thread than on a contended pool (and the same everywhere)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def as_tuple(x: Any) -> Tuple[Any, ...]:
    return x if isinstance(x, tuple) else (x,)


def analyse(model, inputs, ignore: Iterable[str] = ()):
    """trace -> analyze -> couple on ``inputs`` (a tuple of positional inputs)."""
    tr = trace(model, inputs)
    facts = analyze(tr)
    return tr, facts, couple(facts, ignore)


def random_removal(coupling, seed: int, lo: float = 0.3, hi: float = 0.5) -> Set[int]:
    """Remove a random 30-50% of each group's units (at least one unit kept per group)."""
    rng = np.random.default_rng(seed)
    removed: Set[int] = set()
    for g in coupling.groups:
        k = min(g.width - 1, int(round(rng.uniform(lo, hi) * g.width)))
        if k > 0:
            removed.update(int(u) for u in rng.choice(np.array(g.units), k, replace=False))
    return removed


def plan_param_count(gm: torch.nn.Module, plan) -> int:
    """Sum over parameters of the product of kept sizes, per the plan's arithmetic."""
    total = 0
    for name, p in gm.named_parameters():
        kept = plan.kept.get(name, {})
        total += math.prod(len(kept[d]) if d in kept else s for d, s in enumerate(p.shape))
    return total


def param_count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def shapes(value: Any):
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return tuple(shapes(v) for v in value)
    return None


def leaves(value: Any, path: str = "") -> list:
    """[(path, tensor)] of a (nested) output in a fixed order: tuples, lists and namedtuples by position, dicts by
    sorted key; any other value is a leaf of its own (compared with ==)."""
    if isinstance(value, dict):
        return [leaf for k in sorted(value, key=repr) for leaf in leaves(value[k], f"{path}[{k!r}]")]
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        return [leaf for i, v in enumerate(value) for leaf in leaves(v, f"{path}[{i}]")]
    return [(path, value)]


def relative_error(reference: Any, other: Any) -> float:
    """The tests' own comparison (not obafx.passes.verify's): the largest max|reference - other| / max|reference|
    over the tensors of two outputs of the same structure, float64 arithmetic; inf when the structures, shapes or
    non-tensor leaves differ (a comparison that cannot tell them apart would pass anything)."""
    ref, oth = leaves(reference), leaves(other)
    if [p for p, _ in ref] != [p for p, _ in oth]:
        return math.inf
    worst = 0.0
    for (_, a), (_, b) in zip(ref, oth):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or a != b:
                return math.inf
            continue
        if a.shape != b.shape:
            return math.inf
        if a.numel() == 0:
            continue
        a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
        diff = float((a64 - b64).abs().max())
        scale = float(a64.abs().max())
        worst = max(worst, diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf))
    return worst


def same(a: Any, b: Any) -> bool:
    """Bit-identical (nested) outputs."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def run(gm, inputs):
    with torch.no_grad():
        return gm(*inputs)


def check_keep_all(tr, facts, coupling) -> None:
    """A plan that removes nothing rewrites to a bit-identical module."""
    pruned = rewrite(tr, coupling, facts.shapes, set())
    assert same(run(pruned, tr.inputs), run(tr.gm, tr.inputs))


def check_removal(tr, facts, coupling, removed: Set[int], other: Optional[Tuple] = None, exact: bool = True):
    """Rewrite with ``removed`` and check every oracle; returns the pruned module."""
    pruned = rewrite(tr, coupling, facts.shapes, removed)
    y = run(pruned, tr.inputs)
    ref = run(tr.gm, tr.inputs)
    assert shapes(y) == shapes(ref), "the network's output shape changed"
    if exact:
        err = relative_error(masked_output(tr, coupling, removed), y)
        assert err < EXACT, f"masking equivalence broken: {err}"
    plan = plan_from_removed(coupling, removed)
    assert param_count(pruned) == plan_param_count(tr.gm, plan)
    retraced = fx.symbolic_trace(pruned)
    assert same(run(retraced, tr.inputs), y)
    if other is not None:
        y2 = run(pruned, other)
        assert shapes(y2) == shapes(run(tr.gm, other))
        if exact:
            err = relative_error(masked_output(tr, coupling, removed, inputs=other), y2)
            assert err < EXACT, f"masking equivalence broken on another batch size: {err}"
    return pruned


def check_low_level(model, inputs: Tuple, other: Optional[Tuple] = None, exact: bool = True,
                    seeds: Sequence[int] = (0, 1, 2), prunable: bool = True):
    """Keep-all identity, then random removals over ``seeds``; returns (traced, facts, coupling)."""
    tr, facts, coupling = analyse(model, inputs)
    check_keep_all(tr, facts, coupling)
    removed_any = 0
    for seed in seeds:
        removed = random_removal(coupling, seed)
        removed_any += len(removed)
        check_removal(tr, facts, coupling, removed, other, exact)
    if prunable:
        assert removed_any > 0, f"nothing was prunable; barriers: {coupling.barriers}"
    return tr, facts, coupling


def check_compile(model, inputs: Tuple, exact: bool = True, prunable: bool = True, **kwargs):
    """compile_prune on ``model``: the user's model stays bit-identical, the output shape stays, the report's
    masking error is tiny (``exact``) and, with ``prunable``, something was removed. Returns the pruned module."""
    state = copy.deepcopy(model.state_dict())
    training = model.training
    pruned = obafx.compile_prune(model, inputs, **kwargs)
    assert model.training == training
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    ref = run(model.eval() if not training else model, inputs)
    model.train(training)
    y = run(pruned.eval(), inputs)
    assert shapes(y) == shapes(ref)
    rep = obafx.report(pruned)
    if exact:
        assert rep.masked_error is not None and rep.masked_error < EXACT, rep.masked_error
    if prunable:
        assert rep.params_after < rep.params_before
    assert same(run(fx.symbolic_trace(pruned), inputs), y)
    return pruned
