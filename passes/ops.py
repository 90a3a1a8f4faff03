"""THE table: how each module type, function and method treats channels. An op not in it is a barrier.

Keys: module classes (matched through the MRO, most specific first), function objects, method names, and aten
overloads (torch.export's graphs; most share their torch-level twin's rule).
"""
from __future__ import annotations

import math
import operator
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import rules_aten as A
from . import rules_index as I
from . import rules_layers as L
from . import rules_pieces as P
from . import rules_shape as S

Rule = Callable

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

MODULE_RULES = {
    nn.Conv1d: L.conv, nn.Conv2d: L.conv, nn.Conv3d: L.conv,
    nn.ConvTranspose1d: L.conv_transpose, nn.ConvTranspose2d: L.conv_transpose,
    nn.Linear: L.linear,
    nn.BatchNorm1d: L.batch_norm, nn.BatchNorm2d: L.batch_norm, nn.BatchNorm3d: L.batch_norm,
    nn.InstanceNorm1d: L.batch_norm, nn.InstanceNorm2d: L.batch_norm,
    nn.LayerNorm: L.layer_norm, nn.RMSNorm: L.layer_norm, nn.GroupNorm: L.group_norm,
    nn.PReLU: L.prelu, nn.Embedding: L.embedding, nn.GLU: L.glu,
    nn.MultiheadAttention: L.multihead_attention,
    nn.Flatten: S.reshape, nn.Unflatten: S.unflatten_module,
    nn.PixelShuffle: S.pixel_shuffle, nn.PixelUnshuffle: S.pixel_unshuffle,
    **{m: S.unary for m in _ACTIVATION_MODULES},
    **{m: S.spatial for m in _POOL_MODULES},
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

FUNCTION_RULES = {
    F.conv1d: L.conv, F.conv2d: L.conv, F.conv3d: L.conv, F.linear: L.linear,
    F.prelu: L.prelu, F.glu: L.glu, F.embedding: L.embedding, F.instance_norm: L.batch_norm,
    F.batch_norm: L.batch_norm, F.layer_norm: L.layer_norm, F.rms_norm: L.layer_norm, F.group_norm: L.group_norm,
    torch.matmul: L.matmul, operator.matmul: L.matmul, torch.bmm: L.matmul,
    F.scaled_dot_product_attention: L.sdpa,
    torch.flatten: S.reshape, torch.reshape: S.reshape, torch.squeeze: S.reshape, torch.unsqueeze: S.reshape,
    torch.permute: S.permute, torch.transpose: S.permute, torch.swapaxes: S.permute, torch.movedim: S.permute,
    torch.t: S.permute,
    torch.cat: P.cat, torch.concat: P.cat, torch.concatenate: P.cat, torch.stack: P.stack,
    torch.split: P.split, torch.chunk: P.split, torch.tensor_split: P.split, torch.unbind: P.split,
    operator.getitem: I.getitem, F.pixel_shuffle: S.pixel_shuffle, F.pixel_unshuffle: S.pixel_unshuffle,
    torch.repeat_interleave: S.repeat_interleave, torch.roll: S.roll, getattr: I.attribute, torch._assert: S.no_planes,
    **{f: I.scalar for f in (math.sqrt, math.log, math.exp, math.pow, math.floor, math.ceil, abs)},
    **{f: S.unary for f in _UNARY_FUNCS},
    **{f: S.elementwise for f in _BINARY_FUNCS},
    **{f: S.reduce for f in _REDUCE_FUNCS},
    **{f: S.spatial for f in _SPATIAL_FUNCS},
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

METHOD_RULES = {
    "view": S.reshape, "reshape": S.reshape, "flatten": S.reshape, "unflatten": S.reshape,
    "squeeze": S.reshape, "unsqueeze": S.reshape, "view_as": S.reshape, "reshape_as": S.reshape,
    "permute": S.permute, "transpose": S.permute, "swapaxes": S.permute, "movedim": S.permute, "t": S.permute,
    "expand": S.expand, "expand_as": S.expand, "broadcast_to": S.expand, "repeat": S.repeat,
    "repeat_interleave": S.repeat_interleave, "roll": S.roll,
    "split": P.split, "chunk": P.split, "tensor_split": P.split, "unbind": P.split,
    "sum": S.reduce, "mean": S.reduce, "amax": S.reduce, "amin": S.reduce, "max": S.reduce, "min": S.reduce,
    "std": S.reduce, "var": S.reduce, "norm": S.reduce, "logsumexp": S.reduce,
    "matmul": L.matmul, "bmm": L.matmul, "__matmul__": L.matmul,
    "size": I.size, "numel": I.size, "dim": S.no_planes, "item": S.no_planes,
    **{m: S.unary for m in _UNARY_METHODS},
    **{m: S.elementwise for m in _BINARY_METHODS},
}

_EXTRA_MODULE_RULES = {}
try:  # torchvision's Permute and StochasticDepth are plain modules with known channel behaviour.
    from torchvision.ops.misc import Permute as _TvPermute
    from torchvision.ops.stochastic_depth import StochasticDepth as _TvStochasticDepth

    from torchvision.ops.stochastic_depth import stochastic_depth as _tv_stochastic_depth

    _EXTRA_MODULE_RULES = {_TvPermute: S.permute_module, _TvStochasticDepth: S.unary}
    FUNCTION_RULES[_tv_stochastic_depth] = S.unary
except ImportError:  # torchvision is optional
    pass
MODULE_RULES.update(_EXTRA_MODULE_RULES)


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
FUNCTION_RULES.update({op: FUNCTION_RULES[twin] for op, twin in _ATEN_TWINS.items()})
FUNCTION_RULES.update({op: METHOD_RULES[twin] for op, twin in _ATEN_METHOD_TWINS.items()})
FUNCTION_RULES.update({getattr(aten, n).default: S.unary for n in _ATEN_UNARY})
FUNCTION_RULES.update({getattr(aten.to, k): S.unary for k in ("dtype", "device", "dtype_layout", "other")})
FUNCTION_RULES.update({aten.softmax.int: S.unary, aten.log_softmax.int: S.unary, aten.pow.Tensor_Scalar: S.unary})
FUNCTION_RULES.update({getattr(getattr(aten, n), k): S.elementwise for n, k in _ATEN_ELEMENTWISE})
FUNCTION_RULES.update({
    aten.embedding.default: A.embedding, aten.addmm.default: A.addmm, aten.batch_norm.default: A.batch_norm, aten.slice.Tensor: A.slice_,
    aten.select.int: A.select, aten._assert_tensor_metadata.default: A.assert_metadata,
    aten._assert_scalar.default: S.no_planes,
})


def rule_for(op: str, target, module: Optional[nn.Module] = None) -> Optional[Rule]:
    """The rule for one fx node, or None (a barrier). A rule that fails half-way leaves no half-recorded
    unions behind (see `_all_or_nothing`)."""
    rule = _lookup(op, target, module)
    return _all_or_nothing(rule) if rule is not None else None


def _lookup(op: str, target, module: Optional[nn.Module]) -> Optional[Rule]:
    if op == "call_module":
        for cls in type(module).__mro__:
            if cls in MODULE_RULES:
                return MODULE_RULES[cls]
        return None
    if op == "call_function":
        try:
            return FUNCTION_RULES.get(target)
        except TypeError:  # unhashable target
            return None
    if op == "call_method":
        return METHOD_RULES.get(target)
    return None


# Rules whose ops may take sizes computed from a pruned width (view(b, c // g, ...), expand, split sizes,
# slice bounds): rewrite rewrites changed literal sizes, and getitem checks its bounds itself.
_WIDTH_ARGS_OK = (S.reshape, S.expand, P.split, I.getitem, I.size, I.attribute, I.scalar, S.no_planes, A.slice_,
                  A.select)


def _all_or_nothing(rule: Rule) -> Rule:
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
        if rule not in _WIDTH_ARGS_OK and _has_tensor(call.out):
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
