"""channels_last for CPU training, with a torch CPU bug worked around only where it can strike.

The bug (seen with an earlier torch while writing obafx's training code): the CPU (oneDNN) weight gradient of a
channels_last 1x1 stride-2 convolution with 2-7 input channels segfaulted, aborted or hung; fine from 8 channels.
Pruned ResNet shortcuts are such convolutions, so training used to turn channels_last off for the whole model.
Now only the affected convolutions run in contiguous format (their weight, and their input through a forward
pre-hook); every other layer keeps channels_last. On torch 2.14.1 the bug does not reproduce
(tests/test_channels_last.py sweeps the affected shapes in a subprocess), so the narrowed guard is cheap insurance.
"""
from __future__ import annotations

from typing import Any, List, Tuple

import torch
from torch import nn

AFFECTED_IN_CHANNELS = range(2, 8)


def useful(model: nn.Module) -> bool:
    """channels_last speeds up 2-d convolutions on CPU; a model without one gains nothing."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def affected(conv: nn.Module) -> bool:
    """Whether ``conv`` has the bug's shape: a CPU Conv2d, 1x1, stride above 1, 2-7 input channels."""
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and max(conv.stride) > 1
            and conv.in_channels in AFFECTED_IN_CHANNELS and conv.weight.device.type == "cpu")


def enter(model: nn.Module) -> List[Any]:
    """Put ``model`` in channels_last except the affected convolutions (contiguous weight, input made contiguous
    before each call). Parameters stay the same objects (an optimizer built earlier keeps working). Returns the
    hook handles for ``leave``."""
    model.to(memory_format=torch.channels_last)
    handles = []
    for m in model.modules():
        if affected(m):
            m.weight.data = m.weight.data.contiguous()
            handles.append(m.register_forward_pre_hook(_contiguous_input))
    return handles


def leave(model: nn.Module, handles: List[Any]) -> None:
    """Undo ``enter``: hooks removed, every weight back in ordinary contiguous format."""
    for h in handles:
        h.remove()
    model.to(memory_format=torch.contiguous_format)


def _contiguous_input(module: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
