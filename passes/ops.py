"""THE table: how each module type, function and method treats channels. An op not in it is a barrier.

Keys: module classes (matched through the MRO, most specific first), function objects, and method names.
"""
from __future__ import annotations

import math
import operator
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

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
_WIDTH_ARGS_OK = (S.reshape, S.expand, P.split, I.getitem, I.size, I.attribute, I.scalar, S.no_planes)


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
