"""`obafx demo --quick` (the README's main command, shortened): end to end on real data, with its artefacts."""
import json
from types import SimpleNamespace

import pytest

from obafx.bench.data import default_root


@pytest.mark.skipif(not any(default_root().glob("*")), reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)")
def test_quick_demo_prunes_to_half_the_macs_and_writes_its_report(tmp_path, capsys):
    from obafx.bench.demo import main

    assert main(SimpleNamespace(quick=True, out=str(tmp_path))) == 0
    result = json.loads((tmp_path / "demo.json").read_text())
    assert 0.49 <= result["macs_ratio"] <= 0.51  # macs=0.5 is met within the documented 2%
    assert result["params_pruned"] < result["params_dense"]
    assert result["importance"] == "oba_group" and "confidence=2" in result["scored_with"]  # the defaults it ran
    assert "MACs" in capsys.readouterr().out
