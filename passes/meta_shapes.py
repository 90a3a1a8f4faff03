"""Meta results of common layers computed from their attributes, without running torch's meta kernels.

Torch's meta kernels for convolution, batch/layer norm, activations, ``cat`` and elementwise arithmetic run
Python shape code or decompositions (0.2-2 ms a call), most of a meta run. For the plain cases below the output is
a simple function of the inputs' shapes and the module's attributes; anything else returns None, and the caller
runs the real meta kernel (which then also raises where a real run would). Conv, linear, cat and arithmetic
results are contiguous, as the kernels return them for contiguous inputs; shape-keeping layers keep their input's
strides. tests/test_record.py checks every shortcut against the kernels.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
from torch import nn

_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ELEMENTWISE = frozenset((nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh,
                          nn.Dropout, nn.Identity))  # exact classes only: subclasses may override forward


def module_output(module: nn.Module, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The meta output of ``module(*args, **kwargs)`` for an exact torch layer without hooks called on one meta
    tensor, or None when this module or call is not a plain case."""
    if len(args) != 1 or kwargs or module._forward_hooks or module._forward_pre_hooks:
        return None
    x = args[0]
    if not isinstance(x, torch.Tensor) or not x.is_meta:
        return None
    kind = type(module)
    if kind in _CONVS:
        return _conv(module, x, _CONVS[kind])
    if kind is nn.Linear:
        return _linear(module, x)
    return meta_like(x) if _keeps_shape(module, x) else None


def meta_like(x: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(x)`` for a meta ``x``; dense layouts skip empty_like's Python stride computation."""
    dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta") if dense else torch.empty_like(x)


def cat(tensors: Any = None, dim: int = 0, *, out: Any = None) -> Optional[torch.Tensor]:
    """The meta result of ``torch.cat`` for meta tensors of one dtype and rank whose sizes agree off ``dim``."""
    if out is not None or not isinstance(tensors, (tuple, list)) or not tensors:
        return None
    first = tensors[0]
    if not isinstance(first, torch.Tensor) or not first.is_meta:
        return None
    rank = first.dim()
    if rank == 0 or not isinstance(dim, int) or not -rank <= dim < rank:
        return None
    d = dim % rank
    size = first.shape
    before, after, dtype = size[:d], size[d + 1:], first.dtype
    total = 0
    for t in tensors:  # meta tensors of one dtype and rank, the same sizes off ``d`` (one pass: DenseNets cat 30)
        if not isinstance(t, torch.Tensor) or not t.is_meta or t.dtype != dtype:
            return None
        shape = t.shape
        if len(shape) != rank or shape[:d] != before or shape[d + 1:] != after:
            return None
        total += shape[d]
    shape = list(size)
    shape[d] = total
    return torch.empty(shape, dtype=first.dtype, device="meta")


_BINARY = frozenset((operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
                     torch.div))


def binary(target: Any, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The meta result of an elementwise binary op (a residual add, a scale) on two contiguous meta tensors of one
    shape and floating dtype, or on one such tensor and a Python number; None otherwise (broadcasting, type
    promotion, layouts: the kernel decides)."""
    if target not in _BINARY or kwargs or len(args) != 2:
        return None
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors or not all(t.is_meta and t.is_floating_point() and _plain(t) for t in tensors):
        return None
    first = tensors[0]
    if any(t.shape != first.shape or t.dtype != first.dtype for t in tensors):
        return None
    if len(tensors) == 1 and type(args[0] if args[1] is first else args[1]) not in (int, float):
        return None
    return torch.empty(first.shape, dtype=first.dtype, device="meta")


def _conv(m: nn.Module, x: torch.Tensor, n: int) -> Optional[torch.Tensor]:
    """ConvNd with zero padding on a contiguous input whose channels fit the weight."""
    w = m.weight
    if m.padding_mode != "zeros" or x.dim() not in (n + 1, n + 2) or x.dtype != w.dtype or not _plain(x):
        return None
    batched = x.dim() == n + 2
    if w.dim() != n + 2 or x.shape[1 if batched else 0] != w.shape[1] * m.groups or w.shape[0] % m.groups:
        return None
    if m.bias is not None and tuple(m.bias.shape) != (w.shape[0],):
        return None
    spatial = []
    for i, size in enumerate(x.shape[-n:]):
        pad = 0 if m.padding == "valid" else None if m.padding == "same" else m.padding[i]
        reach = m.dilation[i] * (w.shape[2 + i] - 1) + 1
        out = size if pad is None else (size + 2 * pad - reach) // m.stride[i] + 1
        if out <= 0:
            return None
        spatial.append(out)
    shape = (x.shape[0], w.shape[0], *spatial) if batched else (w.shape[0], *spatial)
    return torch.empty(shape, dtype=x.dtype, device="meta")


def _linear(m: nn.Linear, x: torch.Tensor) -> Optional[torch.Tensor]:
    """Linear on an input whose last dimension fits the weight."""
    w = m.weight
    if x.dim() == 0 or w.dim() != 2 or x.shape[-1] != w.shape[1] or x.dtype != w.dtype:
        return None
    if m.bias is not None and tuple(m.bias.shape) != (w.shape[0],):
        return None
    return torch.empty((*x.shape[:-1], w.shape[0]), dtype=x.dtype, device="meta")


def _plain(x: torch.Tensor) -> bool:
    """Contiguous and not also channels-last (where the kernels' choice of layout is theirs to make)."""
    if not x.is_contiguous():
        return False
    if x.dim() == 4:
        return not x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return not x.is_contiguous(memory_format=torch.channels_last_3d)
    return True


def _keeps_shape(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module`` (an exact torch activation or batch/layer norm) maps ``x`` to a tensor of its shape."""
    kind = type(module)
    if kind in _ELEMENTWISE:
        return True
    if kind in _BATCH_NORMS:
        try:
            module._check_input_dim(x)
        except ValueError:  # the real module call reports it
            return False
        return x.shape[1] == module.num_features
    if kind is nn.LayerNorm:
        k = len(module.normalized_shape)
        return x.dim() >= k and tuple(x.shape[x.dim() - k:]) == tuple(module.normalized_shape)
    return False
