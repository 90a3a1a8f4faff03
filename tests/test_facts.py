"""One vocabulary (issue 14): the facts stages pass on are frozen all the way down, and stages are pure."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from obafx.passes.channel_graph import analyze
from obafx.passes.coupling import couple
from obafx.passes.trace import trace

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _facts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    return analyze(trace(model, torch.randn(1, 3, 9, 9)))


def _snapshot(facts):
    return (facts.store.next_label, len(facts.store.pairs), [p.copy() for p in facts.store.pairs])


def test_couple_is_pure_two_calls_with_different_ignore_do_not_add_up():
    facts = _facts()
    before = _snapshot(facts)
    plain = couple(facts)
    couple(facts, ignore=["0"])  # pins conv 0's output channels, and conv 2's input channels with them
    again = couple(facts)
    after = _snapshot(facts)
    assert before[:2] == after[:2] and all(np.array_equal(a, b) for a, b in zip(before[2], after[2]))
    assert [g.units for g in again.groups] == [g.units for g in plain.groups]
    assert len(couple(facts, ignore=["0"]).groups) == len(plain.groups) - 1


def test_facts_are_immutable_all_the_way_down():
    facts = _facts()
    coupling = couple(facts)
    with pytest.raises(dataclasses.FrozenInstanceError):
        facts.store = None
    with pytest.raises(TypeError):
        facts.store.slots[("x", 0)] = None
    with pytest.raises(TypeError):
        facts.planes["x"] = None
    with pytest.raises(ValueError):
        facts.store.pairs[0][0, 0] = 5
    with pytest.raises(TypeError):
        coupling.slot_units[("x", 0)] = np.zeros(1)
    with pytest.raises(ValueError):
        next(iter(coupling.slot_units.values()))[0] = 5
    with pytest.raises(TypeError):
        coupling.node_units["x"] = None
