"""obafx.bench.data: idx parsing, missing-file errors, the real Fashion-MNIST tensors, calibration batches."""
import gzip
import struct

import numpy as np
import pytest
import torch

from obafx.bench import data
from obafx.passes.errors import ConfigError


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tests/conftest.py


def _idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    """An idx file: zero, zero, type code, ndim, big-endian uint32 dims, big-endian payload."""
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(data._IDX_DTYPES[code]).tobytes()


def _write_split(root, split, images, labels, gz):
    """Write one split's image and label idx files under root (gzipped or plain)."""
    for stem, arr in zip(data._FILES[split], (images, labels)):
        raw = _idx_bytes(arr)
        if gz:
            (root / (stem + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (root / stem).write_bytes(raw)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = _idx_bytes(arr)
    path = tmp_path / "x.idx"
    path.write_bytes(gzip.compress(raw) if gz else raw)
    out = data.read_idx(path)
    assert out.shape == (2, 3, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, arr)


def test_read_idx_wide_dtype_is_big_endian(tmp_path):
    arr = np.array([1, -2, 70000], dtype=np.int32)
    (tmp_path / "w.idx").write_bytes(_idx_bytes(arr, code=0x0C))
    np.testing.assert_array_equal(data.read_idx(tmp_path / "w.idx"), arr)


def test_read_idx_rejects_garbage_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"hello world")
    with pytest.raises(ConfigError, match="not an idx file"):
        data.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(_idx_bytes(np.zeros((4, 4), np.uint8))[:-3])
    with pytest.raises(ConfigError, match="truncated"):
        data.read_idx(tmp_path / "short")


def test_missing_files_error_names_package_and_env_var(tmp_path):
    with pytest.raises(ConfigError) as err:
        data.fashion_mnist("train", root=tmp_path)
    msg = str(err.value)
    assert "apt-get install -y dataset-fashion-mnist" in msg and data.ENV_VAR in msg and str(tmp_path) in msg


def test_env_var_sets_root(tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    assert data.default_root() == tmp_path


@pytest.mark.parametrize("gz", [False, True])
def test_tiny_dataset_padding_and_normalisation(tmp_path, gz):
    images = np.zeros((5, 28, 28), np.uint8)
    images[:, 0, 0] = 255
    labels = np.array([0, 1, 2, 3, 9], np.uint8)
    _write_split(tmp_path, "test", images, labels, gz)
    ds = data.fashion_mnist("test", root=tmp_path, pad_to=32, limit=4)
    x, y = ds.tensors
    assert x.shape == (4, 1, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == [0, 1, 2, 3]
    background = (0 - data.MEAN) / data.STD
    assert torch.allclose(x[:, 0, 0, 0], torch.tensor(background))  # padding = background value
    assert torch.allclose(x[:, 0, 2, 2], torch.tensor((1 - data.MEAN) / data.STD))  # pixel (0,0) shifted by 2


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="split"):
        data.fashion_mnist("valid", root=tmp_path)
    _write_split(tmp_path, "test", np.zeros((2, 28, 28), np.uint8), np.zeros(2, np.uint8), gz=False)
    with pytest.raises(ConfigError, match="pad_to"):
        data.fashion_mnist("test", root=tmp_path, pad_to=20)


def _synthetic(n=100):
    return torch.utils.data.TensorDataset(torch.arange(n).float().view(n, 1), torch.arange(n))


def test_calibration_batches_deterministic_and_fresh_per_step():
    ds = _synthetic(100)
    a = data.calibration_batches(ds, n_batches=3, batch_size=10, seed=1, step=0)
    b = data.calibration_batches(ds, n_batches=3, batch_size=10, seed=1, step=0)
    c = data.calibration_batches(ds, n_batches=3, batch_size=10, seed=1, step=1)
    assert len(a) == 3 and all(x.shape == (10, 1) for x, _ in a)
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, b))
    seen_a = {int(i) for _, y in a for i in y}
    seen_c = {int(i) for _, y in c for i in y}
    assert len(seen_a) == 30 and not seen_a & seen_c  # no repeats within or across steps (until data runs out)
    # step k is the k-th slice of the endless stream
    stream = data.batch_stream(ds, 10, seed=1)
    first6 = [next(stream) for _ in range(6)]
    assert torch.equal(first6[4][1], c[1][1])


def test_batch_stream_wraps_with_new_permutation():
    ds = _synthetic(20)
    stream = data.batch_stream(ds, 10, seed=0)
    epoch0 = torch.cat([next(stream)[1] for _ in range(2)])
    epoch1 = torch.cat([next(stream)[1] for _ in range(2)])
    assert sorted(epoch0.tolist()) == list(range(20)) == sorted(epoch1.tolist())
    assert not torch.equal(epoch0, epoch1)


def test_batch_loader_seeded_order():
    ds = _synthetic(50)
    orders = [[y.tolist() for _, y in data.batch_loader(ds, 16, shuffle=True, seed=3)] for _ in range(2)]
    assert orders[0] == orders[1] and [len(b) for b in orders[0]] == [16, 16, 16, 2]
    assert [y.tolist() for _, y in data.batch_loader(ds, 25, shuffle=False)] == [list(range(25)),
                                                                                 list(range(25, 50))]


def _real_or_skip():
    try:
        data._raw_split(str(data.default_root()), "test")
    except ConfigError as e:
        pytest.skip(f"Fashion-MNIST not installed ({e})")


def test_real_fashion_mnist_shapes_and_stats():
    _real_or_skip()
    test = data.fashion_mnist("test")
    x, y = test.tensors
    assert x.shape == (10000, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert sorted(y.unique().tolist()) == list(range(10))
    # unpadded training images are normalised to mean 0 / std 1 by the constants
    train28 = data.fashion_mnist("train", pad_to=None, limit=20000).tensors[0]
    assert train28.shape[-1] == 28
    assert abs(train28.mean().item()) < 0.02 and abs(train28.std().item() - 1) < 0.02


def test_real_loaders():
    _real_or_skip()
    train_loader, test_loader = data.loaders(batch_size=64, train_limit=256, test_limit=100)
    x, y = next(iter(train_loader))
    assert x.shape == (64, 1, 32, 32) and y.shape == (64,)
    assert sum(len(y) for _, y in test_loader) == 100
