"""Graph dumps and the command line."""
import json
import re
import shutil

import networkx as nx
import torch

from obafx import cli
from obafx.dump import channel_graph, group_table, inspect_model, to_dot, write_dumps
from tests.small_nets import ConcatNet


def test_group_table_and_channel_graph():
    analysis = inspect_model(ConcatNet(), torch.randn(1, 3, 16, 16))
    table = group_table(analysis.coupling)
    for g in analysis.coupling.groups:
        assert g.id in table
    graph = channel_graph(analysis)
    # every fx node is in the graph, and data flow edges follow the fx graph
    names = {n.name for n in analysis.facts.traced.gm.graph.nodes}
    assert names <= set(graph.nodes)
    cat = next(n for n, a in graph.nodes(data=True) if a.get("rule") == "cat")
    assert graph.in_degree(cat) == 2
    # slots carry their group; the classifier's output slot is pinned (the network output never shrinks)
    assert graph.nodes["head.weight[0]"]["pinned"]
    assert graph.nodes["a.weight[0]"]["groups"]
    dot = to_dot(graph)
    assert dot.startswith("digraph") and '"cat"' in dot


def test_write_dumps_round_trips_json(tmp_path):
    analysis = inspect_model(ConcatNet(), torch.randn(1, 3, 16, 16))
    files = write_dumps(analysis, tmp_path, svg=shutil.which("dot") is not None)
    data = json.loads((tmp_path / "channel_graph.json").read_text())
    g = nx.node_link_graph(data, edges="links")
    assert g.number_of_nodes() == channel_graph(analysis).number_of_nodes()
    if shutil.which("dot"):
        assert (tmp_path / "channel_graph.svg").read_text().lstrip().startswith("<?xml")
    assert "groups" in files and (tmp_path / "groups.txt").read_text().strip()


def test_cli_inspect_and_prune(tmp_path, capsys):
    threads = torch.get_num_threads()
    assert cli.main(["inspect", "resnet18", "--input", "1,3,32,32", "--out", str(tmp_path / "i")]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.conv1" in out
    assert cli.main(["prune", "resnet18", "--input", "1,3,32,32", "--macs", "0.5", "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "CPU latency" in out and "MACs" in out
    row = next(line for line in out.splitlines() if "CPU latency" in line)
    assert re.search(r"\d+\.\d+ \[\d+\.\d+-\d+\.\d+\]", row), row  # median [min-max]
    assert "1 CPU thread(s)" in out and torch.get_num_threads() == threads  # pinned, then restored
    rep = json.loads((tmp_path / "p" / "report.json").read_text())
    assert abs(rep["macs_ratio"] - 0.5) <= 0.02


def test_cli_prune_round_to_keep_narrow(tmp_path, capsys):
    args = ["prune", "resnet18", "--input", "1,3,32,32", "--macs", "0.5", "--round-to", "64", "--out", str(tmp_path)]
    assert cli.main(args + ["--keep-narrow"]) == 0
    groups = json.loads((tmp_path / "report.json").read_text())["groups"]
    assert all(g["width_after"] == 64 for g in groups if g["width_before"] == 64)  # layer1 is left whole
    assert all(g["width_after"] % 64 == 0 for g in groups) and any(g["width_after"] < g["width_before"] for g in groups)
    capsys.readouterr()


def test_cli_refuses_pickle_without_trust(tmp_path, capsys):
    path = tmp_path / "m.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    assert cli.main(["inspect", str(path), "--input", "1,2"]) == 2
    assert "--trusted" in capsys.readouterr().err


def test_cli_model_file_factory(tmp_path, capsys):
    src = tmp_path / "mine.py"
    src.write_text("import torch.nn as nn\n"
                   "def build():\n"
                   "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))\n")
    assert cli.main(["inspect", f"{src}:build", "--input", "1,3,12,12", "--out", str(tmp_path / "o")]) == 0
    assert "0" in capsys.readouterr().out


def test_cli_unknown_model_is_a_clear_error(capsys):
    assert cli.main(["inspect", "not_a_model", "--input", "1,3,8,8"]) == 2
    assert "torchvision" in capsys.readouterr().err
