"""Budgets that hold (issue 14): a macs= result lands within fit.TOLERANCE of its target on both sides, or the
report carries a note saying why, a warning is raised and the result is the closest one not above the target."""
from __future__ import annotations

import warnings

import pytest
import torch

import obafx
from obafx.passes.errors import BudgetError
from obafx.passes.fit import MISSED, TOLERANCE, fit_budget
from tests.budget_nets import Mixer, RandomConvNet

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _kept(model, x, budget, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = obafx.compile_prune(model, x, macs=budget, **kw)
    rep = obafx.report(pruned)
    return rep.macs_after / rep.macs_before, rep.notes, [str(w.message) for w in caught]


def test_mixer_lands_within_tolerance():
    torch.manual_seed(0)
    kept, notes, _ = _kept(Mixer().eval(), torch.randn(2, 3, 32, 32), 0.6, importance="magnitude")
    assert abs(kept - 0.6) <= TOLERANCE * 0.6, (kept, notes)
    assert not notes


@pytest.mark.parametrize("seed,budget", [(1, 0.8), (5, 0.4), (5, 0.6), (6, 0.4), (9, 0.8), (11, 0.4), (12, 0.4)])
def test_random_conv_nets_land_within_tolerance_from_below(seed, budget):
    """These landed 2-4% below the target before the loop corrected upward misses (e.g. seed 1: 0.771 for 0.8)."""
    torch.manual_seed(seed)
    kept, notes, _ = _kept(RandomConvNet(seed).eval(), torch.randn(2, 3, 16, 16), budget)
    assert abs(kept - budget) <= TOLERANCE * budget + 1e-9, (kept, notes)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("seed", range(8))
def test_random_conv_nets_meet_the_budget_or_say_why(seed, steps):
    """A miss is noted (and warned about) only for the result: an earlier step's miss is the next step's to fix."""
    torch.manual_seed(seed)
    net, x = RandomConvNet(seed).eval(), torch.randn(2, 3, 16, 16)
    for budget in (0.4, 0.6, 0.8):
        kept, notes, warned = _kept(net, x, budget, steps=steps)
        assert kept <= budget * (1 + TOLERANCE) + 1e-9, (seed, budget, kept)  # never above the band
        if abs(kept - budget) > TOLERANCE * budget:
            assert any(MISSED in n for n in notes), (seed, budget, kept, notes)
            assert any(MISSED in w for w in warned), (seed, budget, warned)
        else:
            assert not notes


# ---------------------------------------------------------------------------- the loop on its own (no model)

def _staircase(costs):
    """A fake selection: aim -> the first k whose estimated cost (k-th entry) is <= aim; the 'module' is k and
    its measured cost is ``costs[k]`` (decreasing)."""
    estimate = [100.0 - 10 * k for k in range(len(costs))]

    def select_at(aim):
        for k, e in enumerate(estimate):
            if e <= aim:
                return set(range(k))
        raise BudgetError("out of reach")
    return select_at, (lambda removed: len(removed)), (lambda k: costs[k])


def test_fit_corrects_a_landing_below_the_target():
    select_at, build, measure = _staircase([100, 92, 85, 79, 70, 61, 50, 40, 30, 20])
    fitted = fit_budget(70.0, select_at, build, measure)  # the estimate aims at k=3 (79)... and k=4 is 70
    assert fitted.cost == 70 and fitted.note is None


def test_fit_corrects_a_landing_above_and_below():
    select_at, build, measure = _staircase([100, 99, 98, 97, 96, 80, 61, 60.5, 40, 30])
    fitted = fit_budget(60.0, select_at, build, measure)
    assert abs(fitted.cost - 60) <= TOLERANCE * 60 and fitted.note is None


def test_fit_keeps_the_closest_feasible_and_says_why():
    select_at, build, measure = _staircase([100, 90, 80, 70, 66, 50, 40, 30, 20, 10])
    fitted = fit_budget(60.0, select_at, build, measure)
    assert fitted.cost == 50  # 66 is closer but above the band: not feasible
    assert MISSED in fitted.note and "0.833x" in fitted.note and "1.100x" in fitted.note


def test_fit_out_of_reach_raises():
    select_at, build, measure = _staircase([100, 90])
    with pytest.raises(BudgetError):
        fit_budget(50.0, select_at, build, measure)


def test_fit_reaches_the_cheapest_selection_when_the_correction_overshoots_the_reachable():
    # The estimate underrates the measured cost (20 aimed, 84 measured), so the proportional correction aims at
    # 4.8, below every estimate (the cheapest is 10): the loop must still try that cheapest selection (cost 82)
    # instead of stopping at the first candidate.
    select_at, build, measure = _staircase([100, 98, 96, 94, 92, 90, 88, 86, 84, 82])
    fitted = fit_budget(20.0, select_at, build, measure)
    assert fitted.cost == 82 and MISSED in fitted.note and "no selection lowered the cost further" in fitted.note


def test_fit_says_when_the_step_starts_below_its_target():
    fitted = fit_budget(70.0, lambda aim: set(), lambda removed: "module", lambda module: 50.0)
    assert fitted.cost == 50 and MISSED in fitted.note and "already costs less" in fitted.note


def test_fit_confirms_a_candidate_that_lands_in_the_band_before_accepting_it():
    # k=4's first measurement (70) is a lucky draw: measured again it is 76, outside 70 ± 2%. Without a second
    # look the loop would accept it; with one it goes on and accepts k=5, whose second look confirms it.
    select_at, build, measure = _staircase([100, 92, 85, 79, 70, 69.5, 50, 40, 30, 20])
    second = {4: 76.0, 5: 70.5}
    looked = []

    def confirm(k):
        looked.append(k)
        return second[k]

    assert fit_budget(70.0, select_at, build, measure).cost == 70  # no confirm: the lucky draw wins
    fitted = fit_budget(70.0, select_at, build, measure, confirm=confirm)
    assert looked == [4, 5] and fitted.module == 5 and fitted.cost == 70.5 and fitted.note is None


def test_fit_takes_a_second_look_at_a_near_miss_too():
    # k=3's first draw (72.5, 1.036x) is just outside 70 ± 2%; measured again (pooled) it is 71, inside. Without a
    # second look at near misses the loop rejects it and lands on k=4 (60), far below; with one it keeps k=3.
    select_at, build, measure = _staircase([100, 92, 85, 72.5, 60, 50, 40, 30, 20, 10])
    looked = []

    def confirm(k):
        looked.append(k)
        return {3: 71.0}.get(k, measure(k))

    fitted = fit_budget(70.0, select_at, build, measure, confirm=confirm)
    assert looked == [3] and fitted.module == 3 and fitted.cost == 71.0 and fitted.note is None
    far = fit_budget(70.0, select_at, build, measure, confirm=lambda k: 75.0)  # confirmed outside: it goes on
    assert far.module == 4 and MISSED in far.note


def test_fit_says_when_its_rounds_ran_out_rather_than_blaming_coarse_steps():
    select_at, build, measure = _staircase([100, 92, 85, 79, 75, 74, 73, 72, 71.8, 10])
    fitted = fit_budget(60.0, select_at, build, measure, rounds=3)  # three new candidates, none within 2% of 60
    assert MISSED in fitted.note and "3 candidates allowed" in fitted.note and "ran out" in fitted.note
    coarse = fit_budget(60.0, *_staircase([100, 90, 80, 70, 66, 50, 40, 30, 20, 10]))
    assert "one more channel group" in coarse.note and "ran out" not in coarse.note
