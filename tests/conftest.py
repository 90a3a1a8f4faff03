"""Fixtures shared by test modules."""
import pytest

from tests.prune_oracles import one_thread


@pytest.fixture(scope="module")
def one_thread_per_module():
    """Tiny models: one intra-op thread is ~10x faster than two on a loaded 2-core machine (no OpenMP spin-waiting
    when other jobs share the cores). Modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    with one_thread():
        yield
