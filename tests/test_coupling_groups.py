"""couple()'s groups against a plain reference: units grouped by the exact set of slots they touch, members
ordered 'out' slots first then by key, units in the root slot's order, ids from the root slot's owner. The
vectorised grouping in coupling.py (hashed slot sets, sorted codes, ranked members) must give exactly these."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch
import torchvision

from obafx.passes.channel_graph import analyze
from obafx.passes.coupling import _check_same_slots, _in_slot_order, _sorted_unique, couple
from obafx.passes.trace import trace
from tests.small_models import CASES

pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tests/conftest.py


def _reference_groups(coupling):
    """{members: (id without any '#n' suffix, units)} computed the slow, obvious way."""
    roles, slot_units = coupling.slot_roles, coupling.slot_units
    touched = defaultdict(set)
    for key, units in slot_units.items():
        for u in set(units.tolist()):
            touched[u].add(key)
    by_slots = defaultdict(list)
    for u, keys in touched.items():
        by_slots[frozenset(keys)].append(u)
    out = {}
    for keys, units in by_slots.items():
        if coupling.pinned in units or not any(roles[k][0] == "out" for k in keys):
            continue
        members = tuple(sorted(keys, key=lambda k: (roles[k][0] != "out", k)))
        root = members[0]
        first = {}
        for i, u in enumerate(slot_units[root].tolist()):
            first.setdefault(u, i)
        owner = roles[root][1]
        out[members] = (f"{owner}:{root[1]}" if root[1] else owner, tuple(sorted(units, key=first.__getitem__)))
    return out


MODELS = {"densenet121": (lambda: torchvision.models.densenet121(), lambda: torch.randn(1, 3, 32, 32)),
          "resnet18": (lambda: torchvision.models.resnet18(), lambda: torch.randn(1, 3, 32, 32)),
          **{f"small:{k}": (c.make, lambda c=c: c.inputs(2)) for k, c in CASES.items()}}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_groups_match_the_reference(name):
    make, inputs = MODELS[name]
    coupling = couple(analyze(trace(make().eval(), inputs())))
    got = {g.members: (g.id.split("#")[0], g.units) for g in coupling.groups}
    assert got == _reference_groups(coupling)
    ids = [g.id for g in coupling.groups]
    assert len(set(ids)) == len(ids) and ids == sorted(ids, key=lambda i: i.split("#")[0])


def test_sorted_unique_is_numpys_unique():
    rng = np.random.default_rng(0)
    runs = np.concatenate([np.sort(rng.integers(0, 10**6, size=int(n))) for n in rng.integers(0, 300, size=50)])
    for a in (runs, rng.integers(-50, 50, size=1000), np.zeros(0, dtype=np.int64), np.array([7, 7, 7])):
        assert np.array_equal(_sorted_unique(a), np.unique(a))


def test_units_in_root_slot_order():
    """A group's units in the order of their first index in the root slot, repeated or not (the reference test's
    models mostly number units in that order already)."""
    scratch = np.zeros(8, dtype=np.int64)
    assert _in_slot_order(np.array([3, 5, 7]), np.array([7, 3, 7, 5, 3]), scratch).tolist() == [7, 3, 5]
    assert _in_slot_order(np.array([3, 5]), np.array([5, 3]), scratch).tolist() == [5, 3]  # one position a unit


def test_slot_set_check_refuses_a_collision():
    """Units bucketed together whose slot lists differ (what a hash collision would make) raise, never group."""
    slots, start, count = np.array([0, 1, 0, 2, 0, 1]), np.array([0, 2, 4]), np.array([2, 2, 2])
    _check_same_slots(slots, start, count, np.array([0, 1, 0]))  # units 0 and 2 share a list: fine
    for ref in (np.array([0, 0, 0]), np.array([0, 1, 1])):
        with pytest.raises(AssertionError, match="collision"):
            _check_same_slots(slots, start, count, ref)
    with pytest.raises(AssertionError, match="collision"):
        _check_same_slots(np.array([0, 1, 0]), np.array([0, 2]), np.array([2, 1]), np.array([0, 0]))


def test_rules_read_layer_parameters_as_getattr_does():
    """Call.param's shortcut reads parameters and buffers from the module's dicts only where getattr would find
    them there: a parametrized weight (a class property), an instance attribute and a missing name go by getattr."""
    from torch import nn
    from torch.nn.utils.parametrizations import weight_norm

    from obafx.passes.call import _module_attr

    plain, normed, odd = nn.BatchNorm2d(3), weight_norm(nn.Conv2d(2, 3, 1)), nn.Linear(2, 2)
    odd.__dict__["bias"] = torch.zeros(7)  # an instance attribute that getattr finds before _parameters
    for module in (plain, normed, odd):
        for attr in ("weight", "bias", "running_mean", "missing"):
            got, expected = _module_attr(module, attr), getattr(module, attr, None)
            assert got is expected or (isinstance(got, torch.Tensor) and torch.equal(got, expected))
    assert "weight" not in normed._parameters and _module_attr(normed, "weight").shape == (3, 2, 1, 1)
