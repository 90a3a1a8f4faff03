"""passes/gc_pause.py: the collector is paused inside the analysis stages and runs again after them (also after
a stage fails); a collector the caller paused stays paused."""
import gc

import pytest
import torch
from torch import nn

from obafx.passes.channel_graph import analyze
from obafx.passes.coupling import couple
from obafx.passes.errors import TraceError
from obafx.passes.gc_pause import paused_gc
from obafx.passes.trace import trace


SEEN = []  # gc.isenabled() each time Probe.forward runs (a module attribute would be the private copy's)


class Probe(nn.Module):
    """Records whether the collector runs while its forward is traced."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        SEEN.append(gc.isenabled())
        return self.conv(x)


def test_stages_pause_the_collector_and_restore_it():
    SEEN.clear()
    traced = trace(Probe(), torch.randn(1, 3, 4, 4))
    assert SEEN == [False] and gc.isenabled()  # paused while fx ran forward, running again after
    couple(analyze(traced))
    assert gc.isenabled()
    with paused_gc():
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer pause holds
    assert gc.isenabled()


def test_collector_runs_again_after_a_failing_trace_and_stays_off_if_it_was():
    class Bad(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return x
            return -x

    with pytest.raises(TraceError):
        trace(Bad(), torch.randn(2))
    assert gc.isenabled()
    gc.disable()
    try:
        trace(nn.Linear(2, 2), torch.randn(1, 2))
        assert not gc.isenabled()
    finally:
        gc.enable()
