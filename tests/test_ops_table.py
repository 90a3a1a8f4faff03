"""The op table (passes/ops.py) is the one place that knows an op, and every entry in it runs in a test.

Every facet function of the table (channel rules, rewrite's literal-size fixes and module fixes) is spied on
while the small test models (tests/small_models.CASES, which tests/test_rules_models.py checks with every
oracle) are analysed and rewritten with random removals: each must run, and each literal fix must change some
node's arguments at least once (a fix that never edits anything is not tested by the masking oracle)."""
from __future__ import annotations

import collections
import warnings

import pytest
import torch
from torch import nn

from torchvision.ops.misc import Permute

from obafx.passes import ops
from obafx.passes.capture import capture
from obafx.passes.channel_graph import analyze
from obafx.passes.coupling import couple
from obafx.passes.macs import flop_counter_macs, thop_macs
from obafx.passes.rewrite import rewrite
from obafx.passes.trace import trace
from tests.prune_oracles import analyse, random_removal
from tests.small_models import CASES

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
EXPORTED = ["batchnorm1d", "embedding", "index_where_mT", "dynamic_halves", "aten_forms"]  # also by torch.export: the aten entries


def _entries():
    return [*ops.MODULES.values(), *ops.FUNCTIONS.values(), *ops.METHODS.values()]


def _spied(monkeypatch):
    """Replace every entry by one whose facets count their calls (and literal fixes their edits)."""
    calls, edits = collections.Counter(), collections.Counter()

    def count(fn, edit=False):
        def spy(*args):
            before = (args[0].args, dict(args[0].kwargs), args[0].target) if edit else None
            out = fn(*args)
            calls[fn] += 1
            if edit and (args[0].args, dict(args[0].kwargs), args[0].target) != before:
                edits[fn] += 1
            return out
        return spy

    for table in (ops.MODULES, ops.FUNCTIONS, ops.METHODS):
        for key, e in list(table.items()):
            monkeypatch.setitem(table, key, ops.Op(
                count(e.rule) if e.rule else None, count(e.literals, edit=True) if e.literals else None,
                count(e.update) if e.update else None, e.scored, e.hessian, e.width_args))
    return calls, edits


def test_every_entry_of_the_op_table_runs_in_a_test(monkeypatch):
    rules = {e.rule for e in _entries() if e.rule} | {e.update for e in _entries() if e.update}
    literals = {e.literals for e in _entries() if e.literals}
    calls, edits = _spied(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, case in CASES.items():
            traced, facts, coupling = analyse(case.make(), case.inputs(2))
            for seed in range(3):
                rewrite(traced, coupling, facts.shapes, random_removal(coupling, seed))
        for name in EXPORTED:  # the aten half of the table runs on torch.export's graphs
            case = CASES[name]
            traced = capture(case.make(), case.inputs(2), how="export")
            facts = analyze(traced)
            coupling = couple(facts)
            rewrite(traced, coupling, facts.shapes, random_removal(coupling, 0))
        # torchvision's Permute is traced through unless it is a leaf module: then its own entry runs
        case = CASES["torchvision_permute"]
        traced = trace(case.make(), case.inputs(2), leaf_modules=[Permute])
        coupling = couple(analyze(traced))
        assert any(n.op == "call_module" and "to_last" in n.target for n in traced.gm.graph.nodes)
        assert any(g.width == 8 for g in coupling.groups)  # the channels still flow through it
    missing = sorted(f"{f.__module__}.{f.__name__}" for f in rules | literals if not calls[f])
    assert not missing, f"op-table functions no test model runs: {missing}"
    idle = sorted(f.__name__ for f in literals if not edits[f])
    assert not idle, f"literal fixes that never changed a node: {idle}"


def test_entries_are_consistent():
    """Each entry names a rule or another facet; the size-taking calls rewrite fixes may take pruned widths."""
    for e in _entries():
        assert e.rule or e.update or e.scored, e
    for key in ("view", "reshape", "expand", "split", "chunk", "unflatten"):
        assert ops.METHODS[key].literals is not None and ops.METHODS[key].width_args, key
    assert set(ops.PRUNABLE_TYPES) == {cls for cls, e in ops.MODULES.items() if e.scored == ("weight", "bias")}


def test_flop_counter_macs_counts_what_thop_counts_and_functional_matmuls():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 5)

        def forward(self, x):
            h = self.conv(x).mean((2, 3))  # (N, 8)
            return self.fc(h) + (h @ torch.ones(8, 5))  # a functional matmul thop cannot see

    x = torch.randn(2, 3, 10, 10)
    net = Net().eval()
    conv_fc = 2 * (8 * 3 * 9 * 8 * 8) + 2 * 8 * 5
    assert flop_counter_macs(net, (x,)) == conv_fc + 2 * 8 * 5
    assert thop_macs(net, (x,))[0] >= conv_fc  # thop adds its own counts for the mean, never the matmul
    assert net.training is False
