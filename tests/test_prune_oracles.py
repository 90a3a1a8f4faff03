"""The tests' own comparison (tests/prune_oracles.py ``relative_error``) is tested: it must tell apart what the
masking oracle relies on it to tell apart, on every output structure, independently of obafx.passes.verify."""
from __future__ import annotations

import collections
import math

import torch

from tests.prune_oracles import relative_error

Pair = collections.namedtuple("Pair", "a b")


def test_equal_outputs_have_no_error():
    t = torch.randn(3, 4)
    assert relative_error(t, t.clone()) == 0.0
    assert relative_error({"x": (t, [t * 2])}, {"x": (t.clone(), [t * 2])}) == 0.0


def test_the_error_is_relative_to_the_reference_maximum():
    ref = torch.tensor([1.0, -4.0, 2.0])
    assert math.isclose(relative_error(ref, torch.tensor([1.0, -4.0, 3.0])), 0.25)
    assert math.isclose(relative_error(ref, torch.tensor([1.5, -4.0, 2.0])), 0.125)


def test_a_difference_in_any_leaf_counts():
    t = torch.ones(2, 2)
    bad = t.clone()
    bad[1, 1] = 3.0
    assert math.isclose(relative_error((t, t, t), (t, t, bad)), 2.0)
    assert math.isclose(relative_error({"a": t, "z": t}, {"a": t, "z": bad}), 2.0)
    assert math.isclose(relative_error(Pair(t, [t]), Pair(t, [bad])), 2.0)
    assert math.isclose(relative_error({"o": (t, {"d": t})}, {"o": (t, {"d": bad})}), 2.0)


def test_different_structures_shapes_or_constants_are_infinitely_apart():
    t = torch.ones(2, 3)
    assert relative_error(t, t[:, :2]) == math.inf
    assert relative_error((t, t), (t,)) == math.inf
    assert relative_error({"a": t}, {"b": t}) == math.inf
    assert relative_error((t, 1), (t, 2)) == math.inf
    assert relative_error((t, None), (t, t)) == math.inf


def test_a_zero_reference_is_compared_exactly():
    z = torch.zeros(3)
    assert relative_error(z, z.clone()) == 0.0
    assert relative_error(z, torch.tensor([0.0, 1e-3, 0.0])) == math.inf


def test_float32_and_float64_compare_in_float64():
    a = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert math.isclose(relative_error(a, a.float() + torch.tensor([0.0, 0.5])), 0.25)


def test_verify_max_relative_error_agrees_with_the_tests_own_comparison():
    """compile_prune's masked_error is verify.max_relative_error: on outputs differing in one element of one leaf
    (of every structure), it must equal the independent comparison above."""
    from obafx.passes.verify import max_relative_error

    gen = torch.Generator().manual_seed(0)
    t = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    bad = t.clone()
    bad[2, 3] += 0.75
    for ref, other in [(t, bad), ((t, t), (t, bad)), ([t, (t,)], [t, (bad,)]), ({"a": t, "b": t}, {"a": t, "b": bad}),
                       (Pair(t, {"x": [t]}), Pair(t, {"x": [bad]})), (t, t.clone())]:
        assert math.isclose(max_relative_error(ref, other), relative_error(ref, other), rel_tol=1e-12)
