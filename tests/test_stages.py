"""compile_prune reads as the pipeline (obafx/stages.py): every stage it names is timed into the report's
``seconds`` and handed to ``on_stage``, which fires for every stage run, in order, "report" last."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import obafx
from obafx import stages

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


@pytest.mark.parametrize("budget", [dict(macs=0.6, steps=2), dict(channels=0.3)], ids=["macs", "channels"])
def test_on_stage_fires_for_every_stage_and_the_report_times_the_same_ones(budget):
    seen = []
    x = torch.randn(4, 3, 10, 10)
    data = [(torch.randn(4, 3, 10, 10), torch.randint(0, 4, (4,)))] * 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = obafx.compile_prune(_net(), x, importance="taylor", data=data, rank="per_mac",
                                     on_stage=lambda name, result: seen.append((name, result)), **budget)
    rep = obafx.report(pruned)
    names = [n for n, _ in seen]
    assert names[:4] == ["trace", "analyze", "couple", "measure"] and names[-1] == "report"
    assert set(names) - {"report"} == set(rep.seconds)  # every timed stage reached on_stage, and nothing else
    assert {"score", "rank", "select", "rewrite", "verify", "recalibrate"} <= set(names)
    assert names.count("verify") == budget.get("steps", 1)
    assert seen[-1][1] is rep
    kinds = {n: type(r).__name__ for n, r in seen}
    assert kinds["trace"] == "Traced" and kinds["analyze"] == "ChannelFacts" and kinds["couple"] == "Coupling"
    assert kinds["rewrite"] == "GraphModule" and kinds["score"] == "dict" and kinds["verify"] == "float"


def test_a_stage_outside_a_recording_is_the_plain_function():
    calls = []
    f = stages.stage("x")(lambda a: calls.append(a) or a + 1)
    assert f(1) == 2 and calls == [1]
    with stages.recording(lambda name, result: calls.append((name, result))) as rec:
        assert f(2) == 3
    assert calls[-1] == ("x", 3) and set(rec.seconds) == {"x"}
