"""compile_prune's own masking check can fail: a deliberately wrong rewrite makes the report's masked_error large
(a check that compared the masked output with itself, or with the original module, would report ~0 here)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import obafx
from obafx import stages
from obafx.passes.rewrite import rewrite as real_rewrite

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).double().eval()


def _mirrored(coupling, removed):
    """The same number of units per group, mirrored within the group: the wrong channels."""
    out = set()
    for g in coupling.groups:
        units = list(g.units)
        out.update(units[len(units) - 1 - units.index(u)] for u in units if u in removed)
    return out


def _prune(monkeypatch, wrong):
    if wrong is not None:  # compile_prune's rewrite stage (obafx/stages.py), replaced by a wrong one
        monkeypatch.setattr(stages, "rewrite", stages.stage("rewrite")(wrong))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    return obafx.report(obafx.compile_prune(_model(), x, channels=0.3, importance="magnitude"))


def test_a_correct_rewrite_has_a_tiny_masked_error(monkeypatch):
    assert _prune(monkeypatch, None).masked_error < 1e-9


def test_a_rewrite_that_removes_the_wrong_channels_has_a_large_masked_error(monkeypatch):
    def wrong(traced, coupling, shapes, removed):
        return real_rewrite(traced, coupling, shapes, _mirrored(coupling, removed))

    assert _prune(monkeypatch, wrong).masked_error > 1e-3


def test_a_rewrite_that_changes_a_kept_weight_has_a_large_masked_error(monkeypatch):
    def wrong(traced, coupling, shapes, removed):
        gm = real_rewrite(traced, coupling, shapes, removed)
        with torch.no_grad():
            next(p for n, p in gm.named_parameters() if n.endswith("weight")).add_(0.5)
        return gm

    assert _prune(monkeypatch, wrong).masked_error > 1e-3
