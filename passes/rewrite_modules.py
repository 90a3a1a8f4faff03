"""Rewrite's module fixes: after its parameters are sliced, a module's size attributes (in/out channels,
features, norm sizes, groups, embed_dim) must agree with them. One function per module type, registered with the
type in ops.py (the op table); each takes (module, new input shape, new output shape).
"""
from __future__ import annotations

from typing import Optional

from torch import nn

Shape = Optional[tuple]


def conv(m: nn.Module, x: Shape, y: Shape) -> None:
    """Conv and ConvTranspose: channels from the new shapes; a depthwise conv keeps groups == in_channels."""
    depthwise = m.groups == m.in_channels and m.groups > 1
    m.in_channels, m.out_channels = x[1], y[1]
    if depthwise:
        m.groups = x[1]


def linear(m: nn.Module, x: Shape, y: Shape) -> None:
    m.in_features, m.out_features = m.weight.shape[1], m.weight.shape[0]


def batch_norm(m: nn.Module, x: Shape, y: Shape) -> None:
    """BatchNorm and InstanceNorm."""
    m.num_features = x[1]


def layer_norm(m: nn.Module, x: Shape, y: Shape) -> None:
    """LayerNorm and RMSNorm: the normalised trailing sizes follow the input's."""
    m.normalized_shape = tuple(x[len(x) - len(m.normalized_shape):])


def group_norm(m: nn.Module, x: Shape, y: Shape) -> None:
    m.num_channels = x[1]


def embedding(m: nn.Module, x: Shape, y: Shape) -> None:
    m.embedding_dim = m.weight.shape[1]


def prelu(m: nn.Module, x: Shape, y: Shape) -> None:
    m.num_parameters = m.weight.shape[0]


def multihead_attention(m: nn.Module, x: Shape, y: Shape) -> None:
    """Packed projections: whole heads went with their input blocks, so head_dim stays."""
    if m.in_proj_weight is not None:
        e = m.in_proj_weight.shape[1]
        m.embed_dim = m.kdim = m.vdim = e
        m.num_heads = e // m.head_dim
    m.out_proj.in_features, m.out_proj.out_features = m.out_proj.weight.shape[1], m.out_proj.weight.shape[0]
