"""Smoke run of benchmarks/score_noise.py on a tiny setting, and its agreement measure on known inputs."""
import json

import numpy as np
import pytest

from obafx.bench.data import default_root
from tests.bench_scripts import load_benchmark


def _bench():
    return load_benchmark("score_noise")


def test_agreement_is_one_for_the_same_order_and_minus_one_for_the_reverse():
    bench = _bench()
    a = np.array([0.3, 0.1, 0.9, 0.5])
    assert bench.agreement([a, a * 7 + 1], np.arange(4)) == pytest.approx(1.0)
    assert bench.agreement([a, -a], np.arange(4)) == pytest.approx(-1.0)
    assert bench.agreement([a, np.array([0.1, 0.3, 0.9, 0.5])], np.array([2, 3])) == pytest.approx(1.0)


@pytest.mark.skipif(not any(default_root().glob("*")), reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)")
def test_tiny_run_writes_every_criterion_and_magnitude_ignores_the_data(tmp_path, monkeypatch):
    """Magnitude does not read the calibration images, so its rankings on two sets agree exactly: a check that
    the sets are scored independently through the same unit order."""
    bench = _bench()
    monkeypatch.setitem(bench.CRITERIA, "oba residual train signed", ("taylor", dict(train=True)))  # cheaper
    out = tmp_path / "sn.json"
    assert bench.main(["--splits", "2", "--batches", "1", "--size", "8", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["models"]["resnet20"]["criteria"]
    assert set(rows) == set(bench.CRITERIA)
    assert rows["magnitude"]["all_units"] == 1.0 and rows["magnitude"]["stream_units"] == 1.0
    assert all(-1 <= r["all_units"] <= 1 for r in rows.values())
    assert rows["taylor signed"]["all_units"] < 1.0  # data-driven: two image sets give two rankings
    assert data["models"]["resnet20"]["stream_units"] > 0 and "machine" in data and "protocol" in data
