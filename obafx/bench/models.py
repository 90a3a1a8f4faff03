"""Small trainable models for obafx's benchmarks and tests.

Every model takes (N, in_ch, 32, 32) and traces with ``torch.fx.symbolic_trace``: no data-dependent
control flow, and every reshape takes its sizes from the tensor (or ``-1``) rather than from attributes that
would go stale once channels or heads are pruned.
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from obafx.passes.errors import ConfigError


# ----------------------------------------------------------------------------------------------- ResNet

class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU (He et al. 2016, CIFAR layout).

    When the shape changes (stride or channels) the shortcut is a 1x1 conv + BN ("option B"), so that pruning
    sees a residual add coupling two convolutions' output channels.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: stem conv, 3 stages of ``n`` BasicBlocks (strides 1/2/2), global pool, fc."""

    def __init__(self, n: int, num_classes: int = 10, in_ch: int = 1, width: int = 16):
        super().__init__()
        _check_positive(n=n, num_classes=num_classes, in_ch=in_ch, width=width)
        chans = [width, 2 * width, 4 * width]  # 16/32/64 at width=16
        self.conv1 = nn.Conv2d(in_ch, chans[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(chans[0])
        stages, in_planes = [], chans[0]
        for i, planes in enumerate(chans):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(chans[2], num_classes)
        _init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet20(num_classes: int = 10, in_ch: int = 1, width: int = 16) -> CifarResNet:
    """ResNet-20 (3 stages x 3 blocks); width scales the 16/32/64 channels (width=16: ~0.27M params)."""
    return CifarResNet(3, num_classes, in_ch, width)


def resnet56(num_classes: int = 10, in_ch: int = 1, width: int = 16) -> CifarResNet:
    """ResNet-56 (3 stages x 9 blocks); width scales the 16/32/64 channels (width=16: ~0.86M params)."""
    return CifarResNet(9, num_classes, in_ch, width)


# ---------------------------------------------------------------------------------------------------- VGG

VGG_CFG = (32, "M", 64, "M", 128, 128, "M", 256, 256, "M")


class VGGBN(nn.Module):
    """VGG-style conv3x3-BN-ReLU stacks with 2x2 max pools ('M' in cfg), then flatten -> Linear -> ReLU -> Linear.

    The flatten feeds a Linear directly, so pruning the last conv's channels must slice the Linear's input
    in blocks of (H*W) features: a coupling a pruner has to get right.
    """

    def __init__(self, num_classes: int = 10, in_ch: int = 1, cfg: Sequence[Union[int, str]] = VGG_CFG,
                 input_size: int = 32, hidden: int = 256):
        super().__init__()
        _check_positive(num_classes=num_classes, in_ch=in_ch, input_size=input_size, hidden=hidden)
        layers, c, side = [], in_ch, input_size
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                side //= 2
            elif isinstance(v, int) and v > 0:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
                c = v
            else:
                raise ConfigError(f"vgg_bn cfg entry {v!r} is neither a positive channel count nor 'M'. "
                                  f"What to do: pass e.g. cfg={VGG_CFG}.")
        if side < 1 or c == in_ch:
            raise ConfigError(f"vgg_bn cfg {tuple(cfg)} leaves a {side}x{side}x{c} feature map for a "
                              f"{input_size}x{input_size} input. What to do: use at most "
                              f"{input_size.bit_length() - 1} 'M' entries and at least one conv.")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(c * side * side, hidden), nn.ReLU(),
                                        nn.Linear(hidden, num_classes))
        _init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg_bn(num_classes: int = 10, in_ch: int = 1, cfg: Sequence[Union[int, str]] = VGG_CFG,
           hidden: int = 256) -> VGGBN:
    """VGG-BN for 32x32 inputs (default cfg: 6 convs, 4 pools, 2x2x256 -> 256 -> classes; ~1.4M params)."""
    return VGGBN(num_classes, in_ch, cfg, 32, hidden)


# ---------------------------------------------------------------------------------------------------- ViT

class Attention(nn.Module):
    """Multi-head self-attention written out by hand (qkv Linear split into heads, softmax, proj Linear).

    Reshapes use ``self.head_dim`` and ``-1`` for the head count, so pruning whole heads (slicing qkv's
    outputs and proj's inputs) needs no attribute update.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"dim={dim} is not divisible by heads={num_heads}. What to do: pick dim as a "
                              f"multiple of heads (e.g. dim=96, heads=3).")
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N = x.shape[0], x.shape[1]
        qkv = self.qkv(x).reshape(B, N, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)  # 3, B, heads, N, hd
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        return self.proj(out)


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision transformer: conv patch embedding, class token, learned position embedding, blocks, head."""

    def __init__(self, num_classes: int = 10, in_ch: int = 1, img_size: int = 32, patch: int = 4,
                 dim: int = 96, depth: int = 4, heads: int = 3, mlp_ratio: float = 2.0):
        super().__init__()
        _check_positive(num_classes=num_classes, in_ch=in_ch, patch=patch, dim=dim, depth=depth, heads=heads)
        if img_size % patch:
            raise ConfigError(f"patch={patch} does not tile a {img_size}x{img_size} image. What to do: pick a "
                              f"divisor of {img_size} (e.g. 4).")
        n_patches = (img_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_ch, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_vit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # B, patches, dim
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_tiny(num_classes: int = 10, in_ch: int = 1, patch: int = 4, dim: int = 96, depth: int = 4,
             heads: int = 3, mlp_ratio: float = 2.0) -> ViT:
    """A tiny ViT for 32x32 inputs (defaults: 64 patches + class token, dim 96, 4 blocks, 3 heads of 32)."""
    return ViT(num_classes, in_ch, 32, patch, dim, depth, heads, mlp_ratio)


# ---------------------------------------------------------------------------------------------- helpers

def _check_positive(**values: int) -> None:
    """Raise ConfigError naming the first argument that is not a positive integer."""
    for name, v in values.items():
        if not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{name}={v!r} must be a positive integer. What to do: pass e.g. {name}=16.")


def _init_conv_bn(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, ReLU), BN weight 1 / bias 0: the usual CIFAR ResNet/VGG init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _init_vit(m: nn.Module) -> None:
    """Truncated-normal(0.02) Linear weights and zero biases: the usual ViT init, trains stably with AdamW."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


MODELS: Dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet56": resnet56,
    "vgg_bn": vgg_bn,
    "vit_tiny": vit_tiny,
}


def build(name: str, **kw) -> nn.Module:
    """Build the model registered as ``name`` in MODELS with keyword arguments ``kw``."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}. What to do: pick one of {sorted(MODELS)}.")
    try:
        return MODELS[name](**kw)
    except TypeError as e:  # unknown keyword: say which ones the builder takes
        import inspect
        params = list(inspect.signature(MODELS[name]).parameters)
        raise ConfigError(f"build({name!r}) got bad arguments ({e}). What to do: use only {params}.") from e
