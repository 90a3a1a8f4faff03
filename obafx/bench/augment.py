"""Training-time augmentation for the 32x32 Fashion-MNIST batches: random crop with padding and horizontal flip.

Done per batch on tensors (no per-example transforms: on a CPU the per-example path costs more than the step),
deterministic for a given seed.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Tuple

import torch

from obafx.bench import data as _data
from obafx.passes.errors import ConfigError

# The value of a black (0) pixel after normalisation: what the padding of a crop shows, like the image border.
BACKGROUND = (0.0 - _data.MEAN) / _data.STD


def crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop (after padding by ``pad`` pixels of background) and random horizontal flip of a batch.

    In: x (N, C, H, W); a seeded generator; pad; whether to flip. Out: a new (N, C, H, W) tensor; each image is
    shifted by an independent offset in [-pad, pad] per axis and mirrored with probability 1/2.
    """
    if x.dim() != 4 or pad < 0:
        raise ConfigError(f"crop_flip needs a (N, C, H, W) batch and pad >= 0, got {tuple(x.shape)}, pad={pad}. "
                          f"What to do: pass image batches.")
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=BACKGROUND)
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]  # (N, 1, H, 1)
    cols = ox[:, None] + torch.arange(w)  # (N, W)
    if flip:
        mirror = torch.rand(n, generator=generator) < 0.5
        cols = torch.where(mirror[:, None], cols.flip(1), cols)
    cols = cols[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n)[:, None, None, None]
    chan = torch.arange(c)[None, :, None, None]
    return padded[batch, chan, rows, cols].contiguous()


class Augmented:
    """A training loader whose batches go through crop_flip; len() and reseeding follow the wrapped loader.

    In: a loader of (x, y) batches (e.g. data.loaders()'s train loader), seed, pad, flip. Iterating yields
    (augmented x, y). ``obafx_generator`` is the wrapped loader's shuffling generator, so train() reseeds the
    batch order as it does for the plain loader; the augmentation generator is reseeded at the same time.
    """

    def __init__(self, loader: Iterable, seed: int = 0, pad: int = 4, flip: bool = True):
        self.loader, self.pad, self.flip = loader, pad, flip
        self.dataset = getattr(loader, "dataset", None)
        self.aug_generator = torch.Generator().manual_seed(seed + 7919)  # own stream: not the shuffling one
        inner = getattr(loader, "obafx_generator", None)
        self.obafx_generator = _Reseeder(inner, self.aug_generator)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            yield crop_flip(x, self.aug_generator, self.pad, self.flip), y


class _Reseeder:
    """Stands in for a generator in train()'s reseeding: manual_seed reseeds the shuffling and augmentation."""

    def __init__(self, shuffle_gen, aug_gen):
        self.shuffle_gen, self.aug_gen = shuffle_gen, aug_gen

    def manual_seed(self, seed: int):
        if self.shuffle_gen is not None:
            self.shuffle_gen.manual_seed(seed)
        self.aug_gen.manual_seed(seed + 7919)
        return self
