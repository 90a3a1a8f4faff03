"""THE op table: everything obafx knows about an op, in one entry per op (`Op`).

An entry says how channels flow through the op (its channel rule; no rule = a barrier), how rewrite fixes its
literal sizes (``literals``) or, for a module type, its size attributes (``update``), which of a module's
parameters the scores cover (``scored``), how it bears on the Hessian-block map (``hessian``), and whether it may
take sizes computed from a pruned width (``width_args``). Keys: module classes (matched through the MRO, most
specific first), function objects, method names, and aten overloads (torch.export's graphs; most share their
torch-level twin's entry). An op in no table is a barrier for channels; for the
Hessian map an op without an entry's ``hessian`` is looked up by bare name in HESSIAN_KINDS ("unknown" if absent).

Adding an op is one entry here (plus its tests): see `Op` and the README's "how to add an op".
"""
from __future__ import annotations

import functools

import math
import operator
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import rewrite_literals as R
from . import rewrite_modules as U
from . import rules_aten as A
from . import rules_index as I
from . import rules_layers as L
from . import rules_pieces as P
from . import rules_shape as S
from .ops_hessian import HESSIAN_KINDS, bare_name

Rule = Callable
# Rules whose ops may take sizes computed from a pruned width (view(b, c // g, ...), expand, split sizes, slice
# bounds, numbers): rewrite fixes those sizes, and getitem checks its bounds itself. Any other op given such a
# number pins the measured dim (see `_all_or_nothing`).
_WIDTH_RULES = (S.reshape, S.expand, P.split, I.getitem, I.size, I.attribute, I.scalar, S.no_planes)


@dataclass(frozen=True)
class Op:
    """One op's entry. ``rule(call) -> planes``: the channel rule (None: a barrier for channels, the op is known
    only to the other facets). ``literals(node, shapes, kept, new_shapes)``: rewrite's fix of the call's literal
    sizes. ``update(module, new input shape, new output shape)``: rewrite's fix of a module's size attributes.
    ``scored``: a module's parameter attributes that per-parameter scores cover. ``hessian``: the op's kind for
    the Hessian-block map (ops_hessian.py; None: looked up by name). ``width_args``: may take sizes computed
    from a pruned width."""

    rule: Optional[Rule]
    literals: Optional[Callable] = None
    update: Optional[Callable] = None
    scored: Tuple[str, ...] = ()
    hessian: Optional[str] = None
    width_args: bool = False


def op(rule: Optional[Rule], **facets) -> Op:
    """An entry; ``width_args`` defaults to whether the rule is one of the width-taking rules."""
    facets.setdefault("width_args", rule in _WIDTH_RULES)
    return Op(rule, **facets)


def ops(keys, rule: Optional[Rule], **facets) -> Dict:
    """The same entry for several keys."""
    return {k: op(rule, **facets) for k in keys}


_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
    nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Mish, nn.Hardtanh, nn.Softmax, nn.LogSoftmax, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Tanhshrink, nn.Softsign,
)
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Upsample,
    nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d,
)

_CONV = dict(update=U.conv, scored=("weight", "bias"), hessian="layer")
# nn.MultiheadAttention's own projections; its out_proj is an nn.Linear, scored as one.
MHA_PARAMETERS = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight")

MODULES: Dict[type, Op] = {
    **ops((nn.Conv1d, nn.Conv2d, nn.Conv3d), L.conv, **_CONV),
    **ops((nn.ConvTranspose1d, nn.ConvTranspose2d), L.conv_transpose, **_CONV),
    nn.ConvTranspose3d: op(None, **_CONV),  # scored and resized, but its channels are a barrier
    nn.Linear: op(L.linear, update=U.linear, scored=("weight", "bias"), hessian="layer"),
    **ops((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d), L.batch_norm,
          update=U.batch_norm),
    **ops((nn.LayerNorm, nn.RMSNorm), L.layer_norm, update=U.layer_norm),
    nn.GroupNorm: op(L.group_norm, update=U.group_norm),
    nn.PReLU: op(L.prelu, update=U.prelu), nn.Embedding: op(L.embedding, update=U.embedding), nn.GLU: op(L.glu),
    nn.MultiheadAttention: op(L.multihead_attention, update=U.multihead_attention, scored=MHA_PARAMETERS),
    nn.Flatten: op(S.reshape), nn.Unflatten: op(S.unflatten_module),
    nn.PixelShuffle: op(S.pixel_shuffle), nn.PixelUnshuffle: op(S.pixel_unshuffle),
    **ops(_ACTIVATION_MODULES, S.unary),
    **ops(_POOL_MODULES, S.spatial),
}

_UNARY_FUNCS = (
    torch.relu, F.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardswish,
    F.hardsigmoid, F.leaky_relu, F.elu, F.selu, F.softplus, F.mish, F.hardtanh, F.dropout, F.dropout1d,
    F.dropout2d, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, torch.exp, torch.log, torch.sqrt,
    torch.rsqrt, torch.abs, torch.neg, operator.neg, torch.clamp, torch.clip, torch.erf, torch.sin, torch.cos,
    torch.square, F.relu_, torch.relu_, F.normalize,
)
_BINARY_FUNCS = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul, operator.isub,
    operator.itruediv, operator.pow, torch.add, torch.sub, torch.mul, torch.div, torch.where, torch.maximum,
    torch.minimum, torch.pow, torch.true_divide, operator.floordiv, operator.gt, operator.lt, operator.ge,
    operator.le, operator.eq, operator.ne, torch.gt, torch.lt, torch.ge, torch.le, torch.eq, torch.ne,
)
_REDUCE_FUNCS = (torch.sum, torch.mean, torch.amax, torch.amin, torch.max, torch.min, torch.std, torch.var,
                 torch.logsumexp, torch.norm, torch.prod)
_SPATIAL_FUNCS = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.avg_pool1d,
                  F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.interpolate, F.pad,
                  F.adaptive_max_pool2d)

FUNCTIONS: Dict[Callable, Op] = {
    **ops((F.conv1d, F.conv2d, F.conv3d), L.conv), F.linear: op(L.linear),
    F.prelu: op(L.prelu), F.glu: op(L.glu), F.embedding: op(L.embedding),
    **ops((F.instance_norm, F.batch_norm), L.batch_norm),
    **ops((F.layer_norm, F.rms_norm), L.layer_norm, literals=R.layer_norm), F.group_norm: op(L.group_norm),
    **ops((torch.matmul, operator.matmul, torch.bmm), L.matmul), torch.addmm: op(A.addmm),
    F.scaled_dot_product_attention: op(L.sdpa),
    torch.reshape: op(S.reshape, literals=R.sizes), torch.unflatten: op(S.reshape, literals=R.unflatten),
    **ops((torch.flatten, torch.squeeze, torch.unsqueeze), S.reshape),
    **ops((torch.permute, torch.transpose, torch.swapaxes, torch.movedim, torch.t), S.permute),
    **ops((torch.cat, torch.concat, torch.concatenate), P.cat), torch.stack: op(P.stack),
    **ops((torch.split, torch.chunk), P.split, literals=R.split), **ops((torch.tensor_split, torch.unbind), P.split),
    operator.getitem: op(I.getitem, literals=R.getitem),
    F.pixel_shuffle: op(S.pixel_shuffle), F.pixel_unshuffle: op(S.pixel_unshuffle),
    torch.repeat_interleave: op(S.repeat_interleave), torch.roll: op(S.roll), getattr: op(I.attribute),
    torch._assert: op(S.no_planes),
    **ops((math.sqrt, math.log, math.exp, math.pow, math.floor, math.ceil, abs), I.scalar),
    **ops(_UNARY_FUNCS, S.unary),
    **ops(_BINARY_FUNCS, S.elementwise),
    **ops(_REDUCE_FUNCS, S.reduce),
    **ops(_SPATIAL_FUNCS, S.spatial),
}

_UNARY_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "exp", "log", "sqrt", "rsqrt", "abs", "neg", "clamp", "clip",
    "contiguous", "clone", "detach", "float", "double", "half", "to", "type", "type_as", "softmax", "log_softmax",
    "square", "erf", "sin", "cos", "requires_grad_", "__neg__", "cpu", "cuda", "clamp_min", "clamp_max",
)
_BINARY_METHODS = (
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "masked_fill", "masked_fill_", "pow",
    "__add__", "__mul__", "__sub__", "__truediv__", "__radd__", "__rmul__", "maximum", "minimum", "where",
    "gt", "lt", "ge", "le", "eq", "ne",
)

METHODS: Dict[str, Op] = {
    **ops(("view", "reshape"), S.reshape, literals=R.sizes), "unflatten": op(S.reshape, literals=R.unflatten),
    **ops(("flatten", "squeeze", "unsqueeze", "view_as", "reshape_as"), S.reshape),
    **ops(("permute", "transpose", "swapaxes", "movedim", "t"), S.permute),
    **ops(("expand", "broadcast_to"), S.expand, literals=R.sizes), "expand_as": op(S.expand),
    **ops(("repeat", "tile"), S.repeat),
    "repeat_interleave": op(S.repeat_interleave), "roll": op(S.roll),
    **ops(("split", "chunk"), P.split, literals=R.split), **ops(("tensor_split", "unbind"), P.split),
    **ops(("sum", "mean", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp"), S.reduce),
    **ops(("matmul", "bmm", "__matmul__"), L.matmul),
    **ops(("size", "numel"), I.size), **ops(("dim", "item"), S.no_planes),
    **ops(_UNARY_METHODS, S.unary),
    **ops(_BINARY_METHODS, S.elementwise),
}

# The module types whose weight and bias per-parameter scores cover (OBA.md: every Conv/Linear weight and bias).
PRUNABLE_TYPES = tuple(cls for cls, entry in MODULES.items() if entry.scored == ("weight", "bias"))

try:  # torchvision's Permute and StochasticDepth are plain modules with known channel behaviour.
    from torchvision.ops.misc import Permute as _TvPermute
    from torchvision.ops.stochastic_depth import StochasticDepth as _TvStochasticDepth
    from torchvision.ops.stochastic_depth import stochastic_depth as _tv_stochastic_depth

    MODULES.update({_TvPermute: op(S.permute_module), _TvStochasticDepth: op(S.unary)})
    FUNCTIONS[_tv_stochastic_depth] = op(S.unary)
except ImportError:  # torchvision is optional
    pass


# aten overloads (torch.export's training IR), each with the rule of its torch-level twin where the semantics and
# argument order match; aten-only forms have their own rules (rules_aten.py). Unlisted overloads are barriers.
aten = torch.ops.aten
_ATEN_TWINS = {
    aten.linear.default: F.linear, aten.conv1d.default: F.conv1d, aten.conv2d.default: F.conv2d,
    aten.conv3d.default: F.conv3d, aten.conv1d.padding: F.conv1d, aten.conv2d.padding: F.conv2d,
    aten.layer_norm.default: F.layer_norm, aten.rms_norm.default: F.rms_norm, aten.group_norm.default: F.group_norm,
    aten.scaled_dot_product_attention.default: F.scaled_dot_product_attention, aten.prelu.default: F.prelu,
    aten.glu.default: F.glu, aten.matmul.default: torch.matmul, aten.bmm.default: torch.bmm,
    aten.mm.default: torch.matmul, aten.cat.default: torch.cat, aten.stack.default: torch.stack,
    aten.roll.default: torch.roll, aten.pixel_shuffle.default: F.pixel_shuffle,
    aten.repeat_interleave.self_int: torch.repeat_interleave,
    aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d, aten.avg_pool2d.default: F.avg_pool2d,
    aten.max_pool2d.default: F.max_pool2d,
}
_ATEN_METHOD_TWINS = {
    aten.view.default: "view", aten.reshape.default: "reshape", aten._unsafe_view.default: "view",
    aten.flatten.using_ints: "flatten", aten.unflatten.int: "unflatten", aten.unsqueeze.default: "unsqueeze",
    aten.squeeze.default: "squeeze", aten.squeeze.dim: "squeeze", aten.squeeze.dims: "squeeze",
    aten.permute.default: "permute", aten.transpose.int: "transpose", aten.t.default: "t",
    aten.movedim.int: "movedim", aten.expand.default: "expand", aten.repeat.default: "repeat",
    aten.split.Tensor: "split", aten.split_with_sizes.default: "split", aten.chunk.default: "chunk",
    aten.unbind.int: "unbind", aten.sym_size.int: "size", aten.sym_numel.default: "numel",
    aten.mean.dim: "mean", aten.mean.default: "mean", aten.sum.dim_IntList: "sum", aten.sum.default: "sum",
    aten.amax.default: "amax", aten.amin.default: "amin", aten.var.correction: "var", aten.std.correction: "std",
    aten.logsumexp.default: "logsumexp", aten.linalg_vector_norm.default: "norm",
}
_ATEN_UNARY = (
    "relu", "relu_", "gelu", "silu", "silu_", "sigmoid", "tanh", "exp", "log", "sqrt", "rsqrt", "neg", "abs", "cos",
    "sin", "erf", "dropout", "_softmax", "clone", "contiguous", "alias", "_to_copy", "detach", "hardtanh",
    "hardswish", "hardsigmoid", "leaky_relu", "elu", "clamp", "clamp_min", "clamp_max", "square", "reciprocal",
    "mish", "softplus", "lift_fresh_copy", "type_as",
    "full_like", "zeros_like", "ones_like",  # a value per position, whatever the width: planes pass
)
_ATEN_ELEMENTWISE = (
    ("add", "Tensor"), ("add", "Scalar"), ("add_", "Tensor"), ("sub", "Tensor"), ("sub", "Scalar"),
    ("mul", "Tensor"), ("mul", "Scalar"), ("mul_", "Tensor"), ("div", "Tensor"), ("div", "Scalar"),
    ("div", "Tensor_mode"), ("pow", "Tensor_Tensor"), ("where", "self"), ("where", "ScalarOther"),
    ("where", "ScalarSelf"), ("masked_fill", "Scalar"), ("masked_fill", "Tensor"), ("__and__", "Tensor"),
    ("bitwise_and", "Tensor"), ("minimum", "default"), ("maximum", "default"), ("min", "other"), ("max", "other"),
    *((cmp, kind) for cmp in ("eq", "ne", "gt", "lt", "ge", "le") for kind in ("Tensor", "Scalar")),
)
FUNCTIONS.update({o: FUNCTIONS[twin] for o, twin in _ATEN_TWINS.items()})  # the twin's whole entry
FUNCTIONS.update({o: METHODS[twin] for o, twin in _ATEN_METHOD_TWINS.items()})
FUNCTIONS.update(ops([getattr(aten, n).default for n in _ATEN_UNARY], S.unary))
FUNCTIONS.update(ops([getattr(aten.to, k) for k in ("dtype", "device", "dtype_layout", "other")], S.unary))
FUNCTIONS.update(ops([aten.softmax.int, aten.log_softmax.int, aten.pow.Tensor_Scalar], S.unary))
FUNCTIONS.update(ops([getattr(getattr(aten, n), k) for n, k in _ATEN_ELEMENTWISE], S.elementwise))
FUNCTIONS.update({
    aten.embedding.default: op(A.embedding), aten.addmm.default: op(A.addmm), aten.batch_norm.default: op(A.batch_norm),
    aten.slice.Tensor: op(A.slice_, literals=R.aten_index, width_args=True),
    aten.select.int: op(A.select, literals=R.aten_index, width_args=True),
    aten._assert_tensor_metadata.default: op(A.assert_metadata), aten._assert_scalar.default: op(S.no_planes),
})


def module_op(module: nn.Module) -> Optional[Op]:
    """The entry of a module's type (the most specific class in its MRO with one), or None."""
    for cls in type(module).__mro__:
        if cls in MODULES:
            return MODULES[cls]
    return None


def node_op(op_kind: str, target, module: Optional[nn.Module] = None) -> Optional[Op]:
    """The entry of one fx node (``op_kind`` = node.op), or None."""
    if op_kind == "call_module":
        return module_op(module)
    if op_kind == "call_function":
        try:
            return FUNCTIONS.get(target)
        except TypeError:  # unhashable target
            return None
    if op_kind == "call_method":
        return METHODS.get(target)
    return None


def scored_attributes(module: nn.Module) -> Tuple[str, ...]:
    """The parameter attributes of ``module`` that per-parameter scores cover (its own, not its children's)."""
    entry = module_op(module)
    return entry.scored if entry is not None else ()


def hessian_kind(op_kind: str, target, module: Optional[nn.Module] = None) -> str:
    """The Hessian-block kind of a node: its entry's ``hessian``, else by bare name (modules of torch.nn by
    lower-cased class name; user classes are never matched by name), else "unknown"."""
    entry = node_op(op_kind, target, module)
    if entry is not None and entry.hessian is not None:
        return entry.hessian
    if op_kind == "call_module":
        if not type(module).__module__.startswith("torch.nn"):
            return "unknown"
        return HESSIAN_KINDS.get(type(module).__name__.lower(), "unknown")
    return HESSIAN_KINDS.get(bare_name(target), "unknown")


def rule_for(op_kind: str, target, module: Optional[nn.Module] = None) -> Optional[Rule]:
    """The channel rule for one fx node, or None (a barrier). A rule that fails half-way leaves no
    half-recorded unions behind (see `_all_or_nothing`)."""
    entry = node_op(op_kind, target, module)
    if entry is None or entry.rule is None:
        return None
    return _all_or_nothing(entry.rule, entry.width_args)


@functools.lru_cache(maxsize=None)
def _all_or_nothing(rule: Rule, width_args: bool) -> Rule:
    """``rule`` that, when it raises, first forgets its unions and pins every slot it touched (the caller then
    treats the node as a barrier, which pins the inputs). Any other op that computes a tensor from a number
    measured on a prunable dim (``scores / math.sqrt(q.size(-1))``) pins that dim: pruning would change the
    number."""
    def run(call):
        mark = call.store.mark()
        try:
            planes = rule(call)
        except Exception:
            call.store.rollback(mark)
            raise
        if not width_args and _has_tensor(call.out):
            for w in call.widths():
                call.store.pin_width(w)
        return planes
    run.__name__ = getattr(rule, "__name__", "rule")
    run.__doc__ = rule.__doc__
    return run


def _has_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (tuple, list)) and any(_has_tensor(v) for v in value)
