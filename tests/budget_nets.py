"""Small models on which a MAC budget used to be missed (issue 14): an MLP-Mixer and random small conv nets.

Not a test module: tests/test_budget.py imports these.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn


class MixerBlock(nn.Module):
    """Token-mixing MLP (over patches) and channel-mixing MLP (over channels), each behind a LayerNorm."""

    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.tok1, self.tok2 = nn.Linear(tokens, token_hidden), nn.Linear(token_hidden, tokens)
        self.ch1, self.ch2 = nn.Linear(dim, channel_hidden), nn.Linear(channel_hidden, dim)

    def forward(self, x):  # (N, T, D)
        y = self.ln1(x).transpose(1, 2)
        x = x + self.tok2(F.gelu(self.tok1(y))).transpose(1, 2)
        return x + self.ch2(F.gelu(self.ch1(self.ln2(x))))


class Mixer(nn.Module):
    """Patch-embedding conv, ``depth`` Mixer blocks, LayerNorm, mean-pooled linear head (no BatchNorm)."""

    def __init__(self, size: int = 32, patch: int = 4, dim: int = 48, depth: int = 2, classes: int = 10):
        super().__init__()
        tokens = (size // patch) ** 2
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.blocks = nn.Sequential(*[MixerBlock(tokens, dim, 2 * tokens, 4 * dim) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.ln(self.blocks(x)).mean(1))


class _Block(nn.Module):
    """One random block: conv-BN-ReLU, residual, chunk/cat, SE gate or grouped conv."""

    def __init__(self, kind: str, c: int, rng: random.Random):
        super().__init__()
        self.kind = kind
        w = rng.choice([8, 12, 16, 24])
        if kind == "conv":
            self.conv, self.bn, self.out = nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), w
        elif kind == "res":
            self.a, self.b, self.bn, self.out = nn.Conv2d(c, w, 3, padding=1), nn.Conv2d(w, c, 1), nn.BatchNorm2d(c), c
        elif kind == "chunk":
            self.conv, self.out = nn.Conv2d(c, 2 * w, 1), w + c
        elif kind == "se":
            self.down, self.up, self.out = nn.Linear(c, max(2, c // 4)), nn.Linear(max(2, c // 4), c), c
        else:  # grouped
            g = 4 if c % 4 == 0 and w % 4 == 0 else 1
            self.conv, self.bn, self.out = nn.Conv2d(c, w, 3, padding=1, groups=g), nn.BatchNorm2d(w), w

    def forward(self, x):
        if self.kind in ("conv", "grouped"):
            return F.relu(self.bn(self.conv(x)))
        if self.kind == "res":
            return F.relu(x + self.bn(self.b(F.relu(self.a(x)))))
        if self.kind == "chunk":
            a, b = self.conv(x).chunk(2, dim=1)
            return torch.cat([a * torch.sigmoid(b), x], dim=1)
        s = torch.sigmoid(self.up(F.relu(self.down(x.mean((2, 3))))))
        return x * s[:, :, None, None]


class RandomConvNet(nn.Module):
    """A random small conv net on 16x16 inputs, drawn from ``seed``: stem, 3-5 random blocks, pooled linear head."""

    def __init__(self, seed: int, classes: int = 10):
        super().__init__()
        rng = random.Random(seed)
        c = rng.choice([8, 16])
        self.stem, blocks = nn.Conv2d(3, c, 3, padding=1), []
        for _ in range(rng.randint(3, 5)):
            blocks.append(_Block(rng.choice(["conv", "res", "chunk", "se", "grouped"]), c, rng))
            c = blocks[-1].out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        return self.head(self.blocks(F.relu(self.stem(x))).mean((2, 3)))
