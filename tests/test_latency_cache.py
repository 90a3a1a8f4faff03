"""The latency tables' cache: keyed by every part the numbers depend on, reused, invalidated, robust to damage."""
import json

import pytest
import torch

from obafx.latency_timing import LatencyOptions
from obafx.passes.latency_cache import cache_key, load_tables, split_cached, store_tables
from obafx.passes.latency_model import LayerTable

PARTS = {"device": "cpu:x86_64:2", "torch": "2.14.1", "dtype": "torch.float32", "threads": 1, "mode": "eager",
         "timer": "wall", "inputs": [[1, 3, 8, 8]]}
TABLE = LayerTable((2, 4), (3, 6), ((1.0, 2.0), (3.0, 4.0)))


def test_tables_round_trip_and_merge(tmp_path):
    path = str(tmp_path / "lat.json")
    assert load_tables(path, PARTS) == {}  # no file yet
    store_tables(path, PARTS, {"sig-a": TABLE})
    other = LayerTable((1,), (5,), ((9.0,),))
    store_tables(path, dict(reversed(list(PARTS.items()))), {"sig-b": other})  # same parts, another order
    assert load_tables(path, PARTS) == {"sig-a": TABLE, "sig-b": other}


@pytest.mark.parametrize("part,value", [("device", "cuda:H100"), ("torch", "2.15.0"), ("dtype", "torch.float16"),
                                        ("threads", 2), ("mode", "compile"), ("timer", "fake"),
                                        ("inputs", [[16, 3, 8, 8]])])
def test_a_changed_key_part_misses(tmp_path, part, value):
    path = str(tmp_path / "lat.json")
    store_tables(path, PARTS, {"sig-a": TABLE})
    changed = {**PARTS, part: value}
    assert cache_key(changed) != cache_key(PARTS)
    assert load_tables(path, changed) == {}
    assert load_tables(path, PARTS) == {"sig-a": TABLE}


def test_other_torch_versions_are_dropped_on_write_other_setups_kept(tmp_path):
    path = str(tmp_path / "lat.json")
    store_tables(path, PARTS, {"sig-a": TABLE})
    store_tables(path, {**PARTS, "threads": 2}, {"sig-a": TABLE})
    store_tables(path, {**PARTS, "torch": "2.15.0"}, {"sig-b": TABLE})
    assert load_tables(path, {**PARTS, "torch": "2.15.0"}) == {"sig-b": TABLE}
    assert load_tables(path, PARTS) == {} and load_tables(path, {**PARTS, "threads": 2}) == {}
    store_tables(path, {**PARTS, "torch": "2.15.0", "threads": 2}, {"sig-c": TABLE})
    assert load_tables(path, {**PARTS, "torch": "2.15.0"}) == {"sig-b": TABLE}  # same torch: kept


def test_damaged_files_and_tables_are_measured_again(tmp_path):
    path = tmp_path / "lat.json"
    path.write_text("{not json")
    assert load_tables(str(path), PARTS) == {}
    store_tables(str(path), PARTS, {"sig-a": TABLE, "sig-b": TABLE})  # rewrites the unreadable file
    data = json.loads(path.read_text())
    entry = data["entries"][cache_key(PARTS)]
    entry["layers"]["sig-b"]["seconds"] = [[1.0]]  # wrong shape
    path.write_text(json.dumps(data))
    assert load_tables(str(path), PARTS) == {"sig-a": TABLE}
    path.write_text(json.dumps({"format": 999, "entries": data["entries"]}))
    assert load_tables(str(path), PARTS) == {}
    assert load_tables("", PARTS) == {}  # no cache
    store_tables("", PARTS, {"sig-a": TABLE})


def test_split_cached_keeps_order_and_drops_repeats():
    assert split_cached(("a", "b", "a", "c"), {"b": TABLE}) == (("b",), ("a", "c"))


def test_options_key_names_every_setting():
    x = (torch.randn(4, 3, 8, 8),)
    base = LatencyOptions(threads=1).key_parts(x)
    assert base["torch"] == torch.__version__ and base["mode"] == "eager" and base["inputs"] == [[4, 3, 8, 8]]
    assert base["dtype"] == "torch.float32" and base["timer"] == "wall" and base["device"].startswith("cpu")
    changed = [LatencyOptions(threads=2).key_parts(x), LatencyOptions(threads=1, mode="compile").key_parts(x),
               LatencyOptions(threads=1, dtype=torch.float64).key_parts(x),
               LatencyOptions(threads=1).key_parts((torch.randn(1, 3, 8, 8),)),
               LatencyOptions(threads=1, timer=lambda m, a: 1.0).key_parts(x),
               LatencyOptions(threads=1, clock="process").key_parts(x)]
    keys = {cache_key(p) for p in changed} | {cache_key(base)}
    assert len(keys) == len(changed) + 1
