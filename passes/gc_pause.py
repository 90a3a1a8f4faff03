"""`paused_gc`: Python's cyclic garbage collector paused while an analysis stage runs.

Tracing, the meta run, the channel analysis and coupling allocate hundreds of thousands of short-lived objects
(nodes, proxies, planes, small arrays). Each 700 allocations the collector scans the young ones, and every tenth
scan the older ones too: 5-10% of an analysis of a model of hundreds of modules, for cycles that are still alive.
Paused, the stage makes the same objects and the collector finds any garbage cycles at its next run after the
stage. Nothing the stage computes depends on it. A collector the caller paused stays paused.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Iterator


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause automatic garbage collection for the block; afterwards it runs again if it ran before."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
