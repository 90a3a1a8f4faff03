"""Fashion-MNIST for obafx's benchmarks and tests.

The idx files are read with numpy (no torchvision download code: the machines that run obafx have no
internet). They come from the Debian package ``dataset-fashion-mnist`` or from a folder named by the
environment variable ``OBAFX_FASHION_MNIST``.
"""
from __future__ import annotations

import functools
import gzip
import itertools
import os
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from obafx.passes.errors import ConfigError

ENV_VAR = "OBAFX_FASHION_MNIST"
DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
DEBIAN_PACKAGE = "dataset-fashion-mnist"

# Mean and std of the 60k training pixels scaled to [0, 1] (28x28, before padding). Fixed constants so that
# train, test and any subset are normalised identically.
MEAN = 0.2860
STD = 0.3530

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# idx type codes (third byte of the magic number) -> numpy big-endian dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: os.PathLike | str) -> np.ndarray:
    """Parse one idx file (plain or gzip-compressed, told apart by the gzip magic bytes).

    In: a path. Out: a numpy array with the file's shape and dtype (native byte order).
    Raises ConfigError when the header is not an idx header or the payload has the wrong size.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ConfigError(f"{path} is not an idx file (bad magic {raw[:4].hex()}). What to do: point "
                          f"{ENV_VAR} at the folder holding the original Fashion-MNIST idx files.")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ConfigError(f"{path} is truncated or corrupt: header says shape {shape} ({expected} bytes) "
                          f"but the payload has {len(raw) - header} bytes. What to do: reinstall it with "
                          f"`apt-get install --reinstall -y {DEBIAN_PACKAGE}`.")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def default_root() -> Path:
    """The data folder: ``$OBAFX_FASHION_MNIST`` if set, else the Debian package's folder."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_ROOT)


def _find(root: Path, stem: str) -> Optional[Path]:
    """``root/stem`` or ``root/stem.gz``, whichever exists (plain first), else None."""
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


@functools.lru_cache(maxsize=4)
def _raw_split(root: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 28, 28) and labels (N,) of one split; cached so repeated calls skip the gunzip."""
    paths = [_find(Path(root), stem) for stem in _FILES[split]]
    if None in paths:
        missing = [s for s, p in zip(_FILES[split], paths) if p is None]
        raise ConfigError(
            f"Fashion-MNIST {split} files {missing} (plain or .gz) not found in {root}. What to do: install "
            f"them with `apt-get install -y {DEBIAN_PACKAGE}` (they land in {DEFAULT_ROOT}), or set {ENV_VAR} "
            f"to a folder holding the idx files.")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ConfigError(f"{paths[0]} and {paths[1]} do not match: images {images.shape}, labels "
                          f"{labels.shape}. What to do: reinstall `{DEBIAN_PACKAGE}`.")
    return images, labels


def fashion_mnist(split: str = "train", root: Optional[os.PathLike | str] = None, pad_to: Optional[int] = 32,
                  limit: Optional[int] = None) -> TensorDataset:
    """Fashion-MNIST as tensors.

    In: split "train" (60k) or "test" (10k); root folder (default: ``default_root()``); pad_to: side length
    after zero-padding the 28x28 images symmetrically (None or 28: no padding); limit: keep only the first
    ``limit`` examples. Out: TensorDataset of float32 images (N, 1, pad_to, pad_to), normalised with the
    training set's MEAN/STD (padding gets the background's value), and int64 labels (N,).
    """
    if split not in _FILES:
        raise ConfigError(f"unknown split {split!r}. What to do: pass split='train' or split='test'.")
    images, labels = _raw_split(str(Path(root) if root is not None else default_root()), split)
    if limit is not None:
        if limit <= 0:
            raise ConfigError(f"limit={limit} keeps no examples. What to do: pass a positive limit or None.")
        images, labels = images[:limit], labels[:limit]
    side = images.shape[-1]
    pad_to = side if pad_to is None else pad_to
    if pad_to < side:
        raise ConfigError(f"pad_to={pad_to} is smaller than the {side}x{side} images. What to do: pass "
                          f"pad_to >= {side} (32 for the CIFAR-layout models) or None.")
    x = torch.from_numpy(images).float().div_(255.0)
    lo = (pad_to - side) // 2
    if pad_to != side:
        # Pad with 0 before normalising: the padding then equals the (black) background.
        x = torch.nn.functional.pad(x, (lo, pad_to - side - lo, lo, pad_to - side - lo))
    x = x.sub_(MEAN).div_(STD).unsqueeze(1).contiguous()
    return TensorDataset(x, torch.from_numpy(labels.astype(np.int64)))


def batch_loader(dataset: TensorDataset, batch_size: int, shuffle: bool, seed: int = 0,
                 drop_last: bool = False) -> DataLoader:
    """A DataLoader that indexes ``dataset`` once per batch (no per-example collate: much faster on CPU).

    In: a TensorDataset, batch size, shuffle flag, seed of the shuffling generator. Out: a DataLoader
    yielding (x, y) tuples; num_workers=0 and a seeded generator so the order is the same on every run.
    """
    if batch_size <= 0:
        raise ConfigError(f"batch_size={batch_size} must be positive. What to do: pass e.g. 128.")
    generator = torch.Generator().manual_seed(seed)
    base = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    sampler = BatchSampler(base, batch_size, drop_last)
    # batch_size=None: the sampler yields index lists and TensorDataset indexes all of them at once.
    loader = DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=0)
    loader.obafx_generator = generator  # kept so train() can reseed it (determinism)
    return loader


def loaders(batch_size: int = 128, root: Optional[os.PathLike | str] = None, pad_to: int = 32, seed: int = 0,
            train_limit: Optional[int] = None, test_limit: Optional[int] = None,
            test_batch_size: int = 500) -> Tuple[DataLoader, DataLoader]:
    """Train and test DataLoaders over Fashion-MNIST.

    In: batch size, data root, padding, shuffle seed and optional size limits. Out: (train_loader,
    test_loader); the train loader shuffles with a generator seeded by ``seed``, the test loader does not.
    """
    train_set = fashion_mnist("train", root=root, pad_to=pad_to, limit=train_limit)
    test_set = fashion_mnist("test", root=root, pad_to=pad_to, limit=test_limit)
    return (batch_loader(train_set, batch_size, shuffle=True, seed=seed),
            batch_loader(test_set, test_batch_size, shuffle=False))


def batch_stream(dataset: TensorDataset, batch_size: int, seed: int = 0) -> Iterator[Tuple[torch.Tensor, ...]]:
    """Endless deterministic stream of full batches.

    In: a TensorDataset, batch size, seed. Out: an iterator of (x, y) batches; each pass over the data is a
    fresh permutation (pass e uses seed ``seed + e``), so consecutive batches never repeat an example until
    the whole dataset has been drawn.
    """
    n = len(dataset)
    if not 0 < batch_size <= n:
        raise ConfigError(f"batch_size={batch_size} does not fit a dataset of {n} examples. What to do: pass "
                          f"1 <= batch_size <= {n}.")
    for idx in _index_stream(n, batch_size, seed):
        yield dataset[idx]


def _index_stream(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Index tensors of ``batch_stream``; cheap to skip through (slices of a permutation, no data copied)."""
    for epoch in itertools.count():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start:start + batch_size]


def calibration_batches(dataset: TensorDataset, n_batches: int, batch_size: int = 64, seed: int = 0,
                        step: int = 0) -> List[Tuple[torch.Tensor, ...]]:
    """Batches for pruning-score calibration, fresh for every pruning step.

    In: dataset, number of batches, batch size, seed and the pruning step index. Out: a list of ``n_batches``
    (x, y) batches: batches ``step*n_batches`` to ``(step+1)*n_batches - 1`` of ``batch_stream(dataset,
    batch_size, seed)``. The same (seed, step) always gives the same batches; different steps give
    different batches (disjoint until the dataset is used up).
    """
    if n_batches <= 0 or step < 0:
        raise ConfigError(f"n_batches={n_batches}, step={step}: need n_batches > 0 and step >= 0. What to do: "
                          f"pass e.g. n_batches=200, step=<pruning step index>.")
    if not 0 < batch_size <= len(dataset):
        raise ConfigError(f"batch_size={batch_size} does not fit a dataset of {len(dataset)} examples. What to "
                          f"do: pass 1 <= batch_size <= {len(dataset)}.")
    start = step * n_batches
    # Skip through indices only: late steps must not copy every earlier batch's data.
    chosen = itertools.islice(_index_stream(len(dataset), batch_size, seed), start, start + n_batches)
    return [dataset[idx] for idx in chosen]
