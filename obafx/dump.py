"""Graph dumps a person can read: the group table, the channel graph (networkx node-link JSON and DOT, SVG when
Graphviz is installed), the barrier list, and the heat map of a Hessian-block map (`plot_hessian_blocks`).

In: an `Analysis` (traced model, channel facts, coupling) and optionally the report of a pruning run.
Out: text, or files written under a directory.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import networkx as nx
from torch import nn

from obafx.passes.channel_graph import analyze
from obafx.passes.coupling import couple
from obafx.passes.errors import user_line
from obafx.passes.facts import ChannelFacts, Coupling
from obafx.passes.hessian_blocks import HessianBlocks
from obafx.passes.labels import iter_planes
from obafx.passes.ops import rule_for
from obafx.passes.trace import trace
from obafx.report import Report


@dataclass(frozen=True, eq=False)
class Analysis:
    """The analysis half of the pipeline, kept for inspection."""

    facts: ChannelFacts
    coupling: Coupling


def inspect_model(model: nn.Module, example_input: Any, leaf_modules: Iterable[Any] = (),
                  ignore: Iterable[str] = ()) -> Analysis:
    """Trace and couple ``model`` without pruning it."""
    facts = analyze(trace(model, example_input, leaf_modules))
    return Analysis(facts, couple(facts, ignore))


def group_table(coupling: Coupling, rep: Optional[Report] = None, max_members: int = 6) -> str:
    """One row per group: id, width before (and after, given a report), and its member slots."""
    after = {g["id"]: g["width_after"] for g in rep.groups} if rep is not None else {}
    rows = [("group", "width", "members")]
    for g in coupling.groups:
        width = f"{g.width}" + (f" -> {after[g.id]}" if g.id in after else "")
        names = [f"{n}[{d}]" for n, d in g.members]
        more = f" (+{len(names) - max_members} more)" if len(names) > max_members else ""
        rows.append((g.id, width, ", ".join(names[:max_members]) + more))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{r[0].ljust(w0)}  {r[1].rjust(w1)}  {r[2]}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def barrier_table(coupling: Coupling) -> str:
    if not coupling.barriers:
        return "no barriers: every op on a channel path is in obafx's table"
    return "\n".join(f"BARRIER {b['where']}: {b['why']}" for b in coupling.barriers)


def channel_graph(analysis: Analysis) -> nx.DiGraph:
    """fx nodes (with their channel-carrying dims and widths) and parameter slots (with their group), linked by
    data flow; each edge names the rule that maps channel indices across it."""
    g = nx.DiGraph()
    gm = analysis.facts.traced.gm
    unit_group = analysis.coupling.unit_group()
    for node in gm.graph.nodes:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        rule = rule_for(node.op, node.target, module) if node.op not in ("placeholder", "get_attr", "output") else None
        planes = analysis.facts.planes.get(node.name, ())
        dims = sorted({d for p in iter_planes(planes) for d in p.dims})
        g.add_node(node.name, kind="node", op=node.op, target=_name(node.target), source=user_line(node),
                   shape=str(analysis.facts.shapes.get(node.name)), channel_dims=dims,
                   rule=getattr(rule, "__name__", "barrier" if node.op.startswith("call") else node.op))
        for arg in node.all_input_nodes:
            g.add_edge(arg.name, node.name, rule=g.nodes[node.name]["rule"])
    for (name, dim), units in analysis.coupling.slot_units.items():
        role, owner = analysis.coupling.slot_roles[(name, dim)]
        groups = sorted({unit_group[int(u)] for u in set(units.tolist()) if int(u) in unit_group})
        slot = f"{name}[{dim}]"
        g.add_node(slot, kind="slot", role=role, width=int(len(units)), groups=groups, pinned=not groups)
        user = next((n.name for n in gm.graph.nodes if n.op == "call_module" and n.target == owner), None)
        user = user or next((n.name for n in gm.graph.nodes if n.op == "get_attr" and n.target == name), None)
        if user is not None:
            g.add_edge(slot, user, rule="slot")
    return g


def _name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def to_dot(graph: nx.DiGraph) -> str:
    """Graphviz DOT text: fx nodes as boxes (barriers red), slots as ellipses coloured by pinned/prunable."""
    lines = ["digraph obafx {", "  rankdir=TB; node [fontsize=10];"]
    for n, a in graph.nodes(data=True):
        if a["kind"] == "node":
            color = "red" if a["rule"] == "barrier" else ("black" if a["channel_dims"] else "gray")
            label = f"{n}\\n{a['target']} ({a['rule']})\\n{a['shape']}"
            lines.append(f'  "{n}" [shape=box, color={color}, label="{label}"];')
        else:
            color = "gray" if a["pinned"] else "blue"
            lines.append(f'  "{n}" [shape=ellipse, color={color}, label="{n}\\n{a["role"]} w={a["width"]}"];')
    for u, v, a in graph.edges(data=True):
        lines.append(f'  "{u}" -> "{v}" [label="{a["rule"]}", fontsize=8];')
    lines.append("}")
    return "\n".join(lines)


def write_dumps(analysis: Analysis, out_dir: Path, rep: Optional[Report] = None, svg: bool = True) -> Dict[str, str]:
    """Write groups.txt, barriers.txt, channel_graph.json (node-link), channel_graph.dot (and .svg when
    Graphviz's `dot` is installed) and report.json (given a report). Returns {kind: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    graph = channel_graph(analysis)
    files = {
        "groups": out / "groups.txt", "barriers": out / "barriers.txt",
        "graph_json": out / "channel_graph.json", "graph_dot": out / "channel_graph.dot",
    }
    files["groups"].write_text(group_table(analysis.coupling, rep) + "\n")
    files["barriers"].write_text(barrier_table(analysis.coupling) + "\n")
    files["graph_json"].write_text(json.dumps(nx.node_link_data(graph, edges="links"), indent=1, default=str))
    files["graph_dot"].write_text(to_dot(graph))
    if rep is not None:
        files["report"] = out / "report.json"
        files["report"].write_text(rep.to_json())
    if svg and shutil.which("dot"):
        files["graph_svg"] = out / "channel_graph.svg"
        subprocess.run(["dot", "-Tsvg", str(files["graph_dot"]), "-o", str(files["graph_svg"])], check=True,
                       timeout=120)
    return {k: str(v) for k, v in files.items()}


def plot_hessian_blocks(blocks: HessianBlocks, path: str) -> str:
    """Write a PNG heat map of the block kinds (zero / series / parallel / both) to ``path``; returns path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy; no pyplot, so no global backend change
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    codes, n = {"zero": 0, "series": 1, "parallel": 2, "both": 3}, len(blocks.layers)
    grid = [[codes[blocks.kind(a, b)] for b in blocks.layers] for a in blocks.layers]
    fig = Figure(figsize=(max(4, 0.3 * n + 3), max(3.5, 0.3 * n + 2)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = ListedColormap(["#f4f4f4", "#4c72b0", "#dd8452", "#c44e52"])
    image = ax.imshow(grid, cmap=colours, vmin=-0.5, vmax=3.5)
    ax.set_xticks(range(n), blocks.layers, rotation=90, fontsize=7)
    ax.set_yticks(range(n), blocks.layers, fontsize=7)
    fig.colorbar(image, ticks=[0, 1, 2, 3]).ax.set_yticklabels(list(codes))
    ax.set_title("Nonzero blocks of H - G")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
