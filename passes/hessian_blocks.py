"""Hessian blocks: which layer-pair blocks of the residual Hessian H − G can be nonzero (OBA.md section 2).

H − G = Σ_k r_k ∇²f_k (r = ∂ℓ/∂f, f the network output): the (a, b) block sums, over graph nodes, the node's
second derivative contracted with a tangent from θ_a and one from θ_b. A node contributes only where its op
is nonlinear *jointly* in an a-dependent and a b-dependent input:

- **series** ("path"): b's own node, where b's parameters multiply an input that depends on a (a path from
  a's output to b's input). a == b only when a module is reused on its own output.
- **parallel**: a- and b-dependent values meet as operands of a product (mul, matmul, einsum, attention),
  reason "product"; or, beyond the paper's rules, a smooth nonlinearity (GELU, softmax, LayerNorm, ...) acts
  on a value depending on both, reason "curvature": exact H − G has these terms, the paper's algorithm drops
  them. ``curvature=False`` gives the paper's map (whose zeros are then not zeros of H − G on smooth nets).
  Piecewise-linear ops (ReLU, max-pool) have zero curvature almost everywhere.
- an unknown op is assumed nonlinear in all its inputs (reason "unknown"), so "zero" is always a proof; a
  leaf module owning prunable parameters is one opaque layer.

Dependencies are tracked per tensor, refined by *parts*: a concatenation keeps its pieces' layers apart and
element-wise ops preserve that, so GELU(cat(a, b)) couples a with a and b with b but not a with b.

No scoring option uses the map: one HVP gives every block's contribution at once, so zero blocks cost nothing
there; a block-wise method needs only ``needed_pairs`` (the blocks not proven zero).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from itertools import combinations_with_replacement
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from .errors import ConfigError, TraceError
from .ops import hessian_kind, scored_attributes
from .ops_hessian import bare_name
from .scoring import prunable_parameter_names
from .trace import trace

__all__ = ["HessianBlocks", "Block", "Evidence", "hessian_blocks", "hessian_blocks_of_graph", "needed_pairs"]

Deps = tuple  # tuple of frozensets of layer names: each tensor element depends on the layers of one part
SERIES, PARALLEL = {"path"}, {"product", "curvature", "unknown"}
_CODE = {"zero": ".", "series": "S", "parallel": "P", "both": "B"}

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass(frozen=True)
class Evidence:
    """A node that makes a block nonzero and why: "path", "product", "curvature" or "unknown"."""
    node: str
    reason: str


@dataclass(frozen=True)
class Block:
    """A possibly nonzero block between layers ``a`` and ``b`` (a before or equal to b in graph order)."""
    a: str
    b: str
    kind: str  # "series", "parallel" or "both"
    evidence: tuple[Evidence, ...]  # the first node (graph order) for each reason


@dataclass(frozen=True)
class HessianBlocks:
    """The block map of H − G: ``layers`` in graph order, each layer's parameter names, nonzero blocks."""
    layers: tuple[str, ...]
    layer_params: tuple[tuple[str, tuple[str, ...]], ...]
    blocks: tuple[Block, ...]
    curvature: bool = True

    @functools.cached_property
    def _index(self) -> tuple[dict, dict]:
        return {(b.a, b.b): b for b in self.blocks}, {n: i for i, n in enumerate(self.layers)}

    def _order(self, a: str, b: str) -> tuple[str, str]:
        pos = self._index[1]
        for n in (a, b):
            if n not in pos:
                raise ConfigError(f"'{n}' is not a layer of this map. What to do: use one of {list(self.layers)}")
        return (a, b) if pos[a] <= pos[b] else (b, a)

    def kind(self, a: str, b: str) -> str:
        """"zero", "series", "parallel" or "both" for the (unordered) pair of layer names."""
        block = self.block(a, b)
        return block.kind if block else "zero"

    def block(self, a: str, b: str) -> Optional[Block]:
        """The ``Block`` (kind and evidence) of a pair, or None when it is zero."""
        return self._index[0].get(self._order(a, b))

    def params(self, layer: str) -> tuple[str, ...]:
        """Qualified names of the parameters a layer owns."""
        return dict(self.layer_params)[layer]

    def nonzero_pairs(self) -> list[tuple[str, str]]:
        """Every (a, b) pair with a possibly nonzero block, a before or equal to b in graph order."""
        return [(b.a, b.b) for b in self.blocks]

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (layers, their parameters, nonzero blocks with evidence)."""
        return {"layers": list(self.layers), "layer_params": {k: list(v) for k, v in self.layer_params},
                "curvature": self.curvature,
                "blocks": [{"a": b.a, "b": b.b, "kind": b.kind,
                            "evidence": [{"node": e.node, "reason": e.reason} for e in b.evidence]}
                           for b in self.blocks]}

    def to_text(self) -> str:
        """A layer-by-layer matrix: '.' zero, 'S' series, 'P' parallel, 'B' both (rows labelled i: name)."""
        n = len(self.layers)
        width = len(str(n))
        head = " " * (width + 2) + " ".join(str(j).rjust(width) for j in range(n))
        rows = [f"H - G blocks{'' if self.curvature else ' (paper rules: no activation curvature)'}: "
                ". zero, S series, P parallel, B both", head]
        for i, a in enumerate(self.layers):
            cells = " ".join(_CODE[self.kind(a, b)].rjust(width) for b in self.layers)
            rows.append(f"{str(i).rjust(width)}: {cells}  {a}")
        return "\n".join(rows)


def needed_pairs(blocks: HessianBlocks) -> list[tuple[str, str]]:
    """The layer pairs a block-wise computation of (H − G)θ must evaluate: the nonzero ones. The rest are
    proven zero and need no computation."""
    return blocks.nonzero_pairs()


# --------------------------------------------------------------------------------------------- analysis

def hessian_blocks(model: nn.Module, example_input: Any, leaf_modules: Iterable[Any] = (), *,
                   curvature: bool = True, train: bool = False) -> HessianBlocks:
    """Trace ``model`` (a private copy; leaf_modules: names or types fx must not enter) and classify every
    pair of parameterised layers' block of H − G. ``train`` says how the scores are computed, as in
    ``parameter_scores``: BatchNorm on running stats (affine, default) or on batch statistics (nonlinear).
    Raises TraceError when fx cannot trace the model."""
    traced = trace(model, example_input, leaf_modules)
    return hessian_blocks_of_graph(traced.gm, traced.inputs, curvature=curvature, train=train)


def hessian_blocks_of_graph(gm: fx.GraphModule, inputs: tuple, *, curvature: bool = True,
                            train: bool = False) -> HessianBlocks:
    """The block map of an already traced GraphModule, run once on ``inputs`` to learn which values carry
    derivatives (integers, masks and shapes do not)."""
    data = _differentiable_nodes(gm, inputs)
    layers = _find_layers(gm)
    owner = {p: name for name, (_, params) in layers.items() for p in params}
    deps: dict[fx.Node, Deps] = {}
    found: dict[tuple[str, str], dict[str, str]] = {}
    live = _live_nodes(gm, data)
    order = [name for name, _ in sorted(layers.items(), key=lambda kv: kv[1][0])]
    pos = {n: i for i, n in enumerate(order)}
    for node in gm.graph.nodes:
        out, pairs = _transfer(gm, node, deps, owner, curvature, train)
        deps[node] = _normal(out) if node in data else ()
        if node in live:
            for a, b, reason in pairs:
                key = (a, b) if pos[a] <= pos[b] else (b, a)
                found.setdefault(key, {}).setdefault(reason, node.name)
    blocks = []
    for (a, b) in sorted(found, key=lambda k: (pos[k[0]], pos[k[1]])):
        reasons = found[(a, b)]
        series, parallel = bool(SERIES & reasons.keys()), bool(PARALLEL & reasons.keys())
        kind = "both" if series and parallel else "series" if series else "parallel"
        blocks.append(Block(a, b, kind, tuple(Evidence(nd, r) for r, nd in reasons.items())))
    params = tuple((n, layers[n][1]) for n in order)
    return HessianBlocks(tuple(order), params, tuple(blocks), curvature)


def _differentiable_nodes(gm: fx.GraphModule, inputs: tuple) -> set:
    """Nodes whose value holds a floating-point tensor (the only values that carry derivatives)."""
    seen: set = set()

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in tree_leaves(value)):
                seen.add(n)
            return value
    flags = [(m, m.training) for m in gm.modules()]
    try:
        gm.eval()  # no running-stat updates on the traced copy
        with torch.no_grad():
            Recorder(gm).run(*inputs)
    except Exception as err:  # any failure means the example input does not fit the traced graph
        raise TraceError(f"running the traced graph on example_input failed: {type(err).__name__}: {err}. "
                         f"What to do: pass an example input shaped like one real batch") from err
    finally:
        for m, flag in flags:
            m.training = flag
    return seen


def _find_layers(gm: fx.GraphModule) -> dict[str, tuple[int, tuple[str, ...]]]:
    """Layer name -> (index of its first node, its parameter names): prunable call_modules, leaf modules
    owning prunable parameters, and F.linear/F.conv* whose weight is a get_attr."""
    layers: dict[str, tuple[int, tuple[str, ...]]] = {}
    for i, node in enumerate(gm.graph.nodes):
        name, params = _layer_of(gm, node)
        if name is not None:  # a reused layer keeps its first position and gathers every parameter it uses
            first, known = layers.get(name, (i, ()))
            layers[name] = (first, tuple(dict.fromkeys(known + params)))
    return layers


def _layer_of(gm: fx.GraphModule, node: fx.Node) -> tuple[Optional[str], tuple[str, ...]]:
    """(layer name, parameter names) if ``node`` applies a layer's parameters, else (None, ())."""
    if node.op == "call_module":
        names = prunable_parameter_names(gm.get_submodule(node.target))
        return (node.target, tuple(f"{node.target}.{p}" for p in names)) if names else (None, ())
    if node.op == "call_function" and hessian_kind(node.op, node.target) == "layer":
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if isinstance(weight, fx.Node) and weight.op == "get_attr":
            params = tuple(p.target for p in (weight, bias) if isinstance(p, fx.Node) and p.op == "get_attr")
            return weight.target.removesuffix(".weight"), params
    return None, ()


def _live_nodes(gm: fx.GraphModule, data: set) -> set:
    """Nodes whose value reaches the output through differentiable values (nonzero adjoint possible)."""
    live: set = set()
    for node in reversed(gm.graph.nodes):
        passes = [u for u in node.users if u in live and not (  # detach stops the adjoint
            u.op in ("call_function", "call_method") and hessian_kind(u.op, u.target) == "cut")]
        if node.op == "output" or (node in data and passes):
            live.add(node)
    return live


def _union(deps: Deps) -> frozenset:
    return frozenset().union(*deps)


def _normal(deps: Deps) -> Deps:
    """Drop empty parts and parts contained in another (they add no pair that a larger part lacks)."""
    parts = sorted({p for p in deps if p}, key=len, reverse=True)
    return tuple(p for i, p in enumerate(parts) if not any(p <= q for q in parts[:i]))


def _operands(node: fx.Node, deps: dict) -> list[Deps]:
    """The deps of each tensor operand of ``node`` (lists such as cat's are expanded)."""
    flat = [a for a in tree_leaves((node.args, node.kwargs)) if isinstance(a, fx.Node)]
    return [deps.get(a, ()) for a in flat]


def _elementwise(ops: list[Deps]) -> Deps:
    """Parts of an element-wise result: one multi-part operand keeps its parts, the others' layers join each."""
    multi = [d for d in ops if len(d) > 1]
    if len(multi) != 1:
        return (_union(tuple(p for d in ops for p in d)),)
    rest = _union(tuple(p for d in ops if d is not multi[0] for p in d))
    return tuple(p | rest for p in multi[0])


def _pairs(x: Iterable[str], y: Iterable[str], reason: str) -> list[tuple[str, str, str]]:
    return [(a, b, reason) for a in x for b in y]


def _within(parts: Deps, reason: str) -> list[tuple[str, str, str]]:
    return [(a, b, reason) for p in parts for a, b in combinations_with_replacement(sorted(p), 2)]


def _transfer(gm, node, deps, owner, curvature, train):
    """(output deps, [(a, b, reason)]) for one node."""
    if node.op == "get_attr":
        return ((frozenset({owner[node.target]}),) if node.target in owner else ()), []
    if node.op == "placeholder":
        return (), []
    ops = _operands(node, deps)
    union = _union(tuple(p for d in ops for p in d))
    if node.op == "output":
        return (union,), []
    layer, _ = _layer_of(gm, node)
    if layer is not None:
        return _layer_transfer(gm, node, layer, ops, union)
    kind = _kind(gm, node, train)
    if not curvature:  # the paper's rules: smooth nonlinearities count as linear
        kind = {"ew_curv": "copy", "mix_curv": "mix_linear"}.get(kind, kind)
    if kind in ("copy", "add", "ew_curv"):
        out = _elementwise(ops)
        return out, (_within(out, "curvature") if kind == "ew_curv" else [])
    if kind in ("mix_linear", "mix_curv"):
        return (union,), (_within((union,), "curvature") if kind == "mix_curv" else [])
    if kind in ("cat", "cut"):  # a concatenation keeps its pieces' parts apart
        return (tuple(p for d in ops for p in d) if kind == "cat" else ()), []
    return _product_transfer(node, kind, ops, union)


def _layer_transfer(gm, node, layer, ops, union):
    """A layer's own node: its parameters meet its inputs (series); attention adds its internal products."""
    # A call_module's operands are all inputs; F.linear/F.conv's are (input, weight, bias).
    inputs = union if node.op == "call_module" else _union(ops[0]) if ops else frozenset()
    pairs = _pairs({layer}, inputs, "path")  # includes (layer, layer) when a module is reused on itself
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.MultiheadAttention):
        qk = _union(tuple(p for d in ops[:2] for p in d)) | {layer}
        v = (_union(ops[2]) if len(ops) > 2 else frozenset()) | {layer}
        pairs += _pairs(qk, qk, "product") + _pairs(qk, v, "product")
    elif node.op == "call_module" and not scored_attributes(gm.get_submodule(node.target)):
        pairs += _pairs(union | {layer}, union | {layer}, "unknown")  # opaque leaf module
    return (union | {layer},), pairs


def _product_transfer(node, kind, ops, union):
    """Products pair their operands' layers; anything unknown pairs everything (so zero stays a proof)."""
    u = [_union(d) for d in ops]
    if kind in ("product", "add_product", "layer", "ew_product"):
        # add_product: input + product of the other two; F.linear/F.conv with a computed weight: (input, weight)
        u = u[1:] if kind == "add_product" else u[:2] if kind == "layer" else u
        pairs = [t for i in range(len(u)) for j in range(i + 1, len(u)) for t in _pairs(u[i], u[j], "product")]
        if kind != "ew_product":
            return (union,), pairs
        square = len(node.args) > 1 and node.args[0] is node.args[1]  # x * x: per part
        return _elementwise(ops), (_within(ops[0], "product") if square else pairs)
    if kind == "div" and len(u) >= 1:
        den = _union(ops[-1]) if isinstance(node.args[-1], fx.Node) else frozenset()
        return _elementwise(ops), _pairs(union, den, "product")
    if kind == "sdpa":
        qk = _union(tuple(p for d in ops[:2] for p in d)) | _union(tuple(p for d in ops[3:] for p in d))
        v = _union(ops[2]) if len(ops) > 2 else frozenset()
        return (union,), _pairs(qk, qk, "product") + _pairs(qk, v, "product")
    return (union,), _pairs(union, union, "unknown")


def _kind(gm, node, train: bool) -> str:
    """The op class of a non-layer node, from the op table (ops.hessian_kind); BatchNorm depends on the mode."""
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    if isinstance(module, _BATCH_NORMS):  # eval: per-channel affine; train: batch statistics
        return "mix_curv" if train or not module.track_running_stats else "copy"
    if module is None and bare_name(node.target) == "batch_norm":
        training = node.args[5] if len(node.args) > 5 else node.kwargs.get("training", False)
        return "mix_curv" if training else "copy"
    return hessian_kind(node.op, node.target, module)
