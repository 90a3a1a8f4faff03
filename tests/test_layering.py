"""The layering rule of passes/ (issue 14), checked on the import graph read from the source with ast:

- no import cycles among passes/ modules, lazy (inside functions), under ``if TYPE_CHECKING:`` or not;
- no module of passes/ or obafx/ imports an underscore (private) name from a passes/ module: what stages share
  is named (the vocabulary in facts.py, the helpers in tensors.py, scoring.py, labels.py, ...);
- the vocabulary (facts.py) is the ground floor: it imports no passes/ module but errors.py and tensors.py;
- the pipeline's stages do not import each other: they exchange facts (the op table, labels, scoring machinery,
  plan arithmetic are shared helpers, not stages).
"""
from __future__ import annotations

import ast
import pathlib

import networkx as nx

ROOT = pathlib.Path(__file__).resolve().parent.parent
PASSES = ROOT / "passes"
GROUND = {"facts": {"errors", "tensors"}}
STAGES = {"trace", "channel_graph", "coupling", "importance", "select", "fit", "rewrite", "verify"}


def imports(path: pathlib.Path, package: str):
    """[(imported passes module, [names imported from it])] of one file, lazy imports included. ``package`` is
    the dotted package of the file ("passes" for passes/, else e.g. "obafx")."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level == 1 and package == "passes":
                if node.module:
                    found.append((node.module.split(".")[0], names))
                else:  # from . import x, y
                    found.extend((n, []) for n in names)
            elif node.level == 0 and node.module and node.module.startswith("obafx.passes"):
                rest = node.module[len("obafx.passes"):].lstrip(".")
                if rest:
                    found.append((rest.split(".")[0], names))
                else:
                    found.extend((n, []) for n in names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("obafx.passes."):
                    found.append((a.name.split(".")[2], []))
    return found


def graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for path in sorted(PASSES.glob("*.py")):
        g.add_node(path.stem)
        for target, _ in imports(path, "passes"):
            if (PASSES / f"{target}.py").exists() and target != path.stem:
                g.add_edge(path.stem, target)
    return g


def test_passes_has_no_import_cycles():
    cycles = list(nx.simple_cycles(graph()))
    assert not cycles, f"import cycles in passes/: {cycles}"


def test_nothing_imports_a_private_name_of_a_passes_module():
    files = [(p, "passes") for p in PASSES.glob("*.py")] + \
        [(p, "obafx") for p in (ROOT / "obafx").rglob("*.py") if "passes" not in p.relative_to(ROOT).parts[1:2]]
    bad = [f"{p.relative_to(ROOT)} imports {n} from {t}" for p, pkg in files for t, names in imports(p, pkg)
           for n in names if n.startswith("_") and n != "__version__"]
    assert not bad, "\n".join(bad)


def test_the_vocabulary_is_the_ground_floor():
    g = graph()
    for module, allowed in GROUND.items():
        assert set(g.successors(module)) <= allowed, f"{module} imports {set(g.successors(module)) - allowed}"


def test_stages_do_not_import_each_other():
    g = graph()
    edges = [(a, b) for a, b in g.edges if a in STAGES and b in STAGES]
    assert not edges, f"stages importing stages (pass facts instead): {edges}"


def test_the_checker_sees_cycles_and_private_imports(tmp_path):
    """The rule can fail: a lazy import cycle and a private import written to a scratch file are found."""
    (tmp_path / "a.py").write_text("def f():\n    from .b import _secret\n")
    (tmp_path / "b.py").write_text("from . import a\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                   "    from .c import x\n")
    assert imports(tmp_path / "a.py", "passes") == [("b", ["_secret"])]
    assert imports(tmp_path / "b.py", "passes") == [("a", []), ("c", ["x"])]  # TYPE_CHECKING imports count too
