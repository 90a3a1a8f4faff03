"""One criteria registry (issue 14): a criterion registered once in obafx.passes.importance.REGISTRY is usable
by compile_prune, by distributed scoring and by the Torch-Pruning adapter, with the same per-parameter scores."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import obafx
from obafx.distributed import distributed_importance, local_parameter_scores
from obafx.passes import importance
from obafx.passes.errors import ConfigError
from obafx.passes.facts import ScoreContext
from obafx.tp_interop import CriterionImportance

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _data():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 4, generator=gen), torch.randint(0, 3, (6,), generator=gen))]


@pytest.fixture
def registered(monkeypatch):
    """A new data criterion, "oba_squared" (OBA's per-parameter scores squared), registered in one place."""
    calls = []

    def squared(model, batches, ctx, **kw):
        calls.append(len(batches))
        oba = importance.REGISTRY["oba"].parameters(model, batches, ctx, **kw)
        return {n: s * s for n, s in oba.items()}

    monkeypatch.setitem(importance.REGISTRY, "oba_squared", importance._data_criterion("oba_squared", squared))
    return calls


def test_a_registered_criterion_works_everywhere(registered):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = obafx.compile_prune(_model(), torch.randn(2, 4), channels=0.5, importance="oba_squared",
                                     data=_data())
    assert obafx.report(pruned).importance == "oba_squared" and registered
    local = local_parameter_scores("oba_squared", _model(), _data(), ScoreContext())
    oba = local_parameter_scores("oba", _model(), _data(), ScoreContext())
    assert all(torch.allclose(local[n], oba[n] ** 2) for n in oba)
    assert distributed_importance("oba_squared").needs_data
    CriterionImportance("oba_squared", batches=_data())  # accepted by the adapter's check


def test_unknown_criteria_are_refused_with_the_registry_names():
    for call in (lambda: obafx.compile_prune(_model(), torch.randn(2, 4), channels=0.5, importance="nope"),
                 lambda: distributed_importance("nope"), lambda: CriterionImportance("nope", batches=_data()),
                 lambda: local_parameter_scores("nope", _model(), _data(), ScoreContext())):
        with pytest.raises(ConfigError, match="oba"):
            call()
