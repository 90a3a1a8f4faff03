"""obafx.bench.train: training lowers the loss, determinism, BatchNorm recalibration, evaluation, the cache."""
import json

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from obafx.bench import data, models
from obafx.bench import train as T
from obafx.passes.errors import ConfigError


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tests/conftest.py


def _toy_data(n=256, seed=0):
    """Learnable synthetic images: the class is which quadrant holds a bright square."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.3 * torch.randn(n, 1, 32, 32, generator=g)
    for q in range(4):
        r, c = divmod(q, 2)
        x[y == q, :, 16 * r:16 * r + 16, 16 * c:16 * c + 16] += 1.0
    return torch.utils.data.TensorDataset(x, y)


def _tiny_resnet():
    return models.resnet20(num_classes=4, width=4)


def _loss(model, ds):
    model.eval()
    with torch.no_grad():
        return F.cross_entropy(model(ds.tensors[0]), ds.tensors[1]).item()


def test_training_reduces_loss_and_evaluate_agrees():
    ds = _toy_data()
    loader = data.batch_loader(ds, 32, shuffle=True, seed=0)
    torch.manual_seed(0)
    model = _tiny_resnet()
    T.recalibrate_bn(model, loader, n_batches=4)  # fair "before" loss: running stats of this data
    before = _loss(model, ds)
    history = []
    T.train(model, loader, epochs=3, lr=0.05, progress=False, history=history)
    assert len(history) == 3 * 8 and not model.training
    assert _loss(model, ds) < 0.5 * before
    x, y = ds.tensors
    with torch.no_grad():
        pred = model(x).argmax(1)
    acc = T.evaluate(model, data.batch_loader(ds, 64, shuffle=False))
    assert acc == (pred == y).float().mean().item() and acc > 0.5  # chance is 0.25
    first = T.evaluate(model, data.batch_loader(ds, 64, shuffle=False), limit_batches=1)
    assert first == (pred[:64] == y[:64]).float().mean().item()


def test_channels_last_guard_and_contiguous_result():
    # models with the torch bug's conv shape train in channels_last too (that conv alone runs contiguous:
    # tests/test_channels_last.py)
    assert T.channels_last_ok(models.resnet20(width=4))
    assert T.channels_last_ok(models.resnet20()) and T.channels_last_ok(models.vgg_bn())
    model = models.vgg_bn(num_classes=4, cfg=(8, "M", 16, "M"), hidden=16)
    loader = data.batch_loader(_toy_data(64), 32, shuffle=True)
    T.train(model, loader, max_steps=2, lr=0.01, channels_last=True, progress=False)
    assert all(p.is_contiguous() for p in model.parameters())  # callers get ordinary weights back


def test_same_seed_same_weights_other_seed_differs():
    ds = _toy_data(128)

    def run(seed):
        torch.manual_seed(seed)
        model = _tiny_resnet()
        T.train(model, data.batch_loader(ds, 32, shuffle=True), max_steps=6, lr=0.05, progress=False, seed=seed)
        return model.state_dict()

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_recalibrate_bn_sets_batch_statistics_and_keeps_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout(0.5))
    gm = fx.symbolic_trace(model)  # must work on GraphModules: BNs found via named_modules
    bn = gm.get_submodule("1")
    bn.running_mean.fill_(5.0)
    bn.running_var.fill_(9.0)
    params = {k: v.clone() for k, v in gm.named_parameters()}
    batches = [(torch.randn(8, 1, 10, 10) * 2 + 1, None) for _ in range(3)]
    T.recalibrate_bn(gm, batches, n_batches=2)
    # cumulative average of the two batches' statistics of the conv output
    feats = [model[0](x) for x, _ in batches[:2]]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1 and not gm.training and not bn.training
    assert all(torch.equal(v, params[k]) for k, v in gm.named_parameters())


def test_finetune_needs_exactly_one_budget_and_runs_steps():
    ds = _toy_data(64)
    loader = data.batch_loader(ds, 16, shuffle=True)
    model = _tiny_resnet()
    with pytest.raises(ConfigError, match="exactly one"):
        T.finetune(model, loader)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    T.finetune(model, loader, steps=3)
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.state_dict()["bn1.num_batches_tracked"].item() == 3


def test_bad_arguments():
    model = _tiny_resnet()
    loader = data.batch_loader(_toy_data(32), 16, shuffle=False)
    with pytest.raises(ConfigError, match="optimizer"):
        T.train(model, loader, optimizer="lbfgs", progress=False)
    with pytest.raises(ConfigError, match="epochs"):
        T.train(model, loader, epochs=0, progress=False)
    with pytest.raises(ConfigError, match="unknown model"):
        T.trained("lenet")


def _fake_loaders(seed=0, batch_size=32, **_):
    return data.batch_loader(_toy_data(64), batch_size, True, seed), data.batch_loader(_toy_data(32, 1), 32, False)


def test_trained_caches_weights_and_skips_training(tmp_path, monkeypatch):
    monkeypatch.setattr(T._data, "loaders", _fake_loaders)
    kw = dict(epochs=1, cache_dir=tmp_path, progress=False, num_classes=4, width=4)
    first = T.trained("resnet20", **kw)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".pt")
    meta = json.loads((tmp_path / files[0]).read_text())
    assert meta["name"] == "resnet20" and 0 <= meta["test_acc"] <= 1
    assert set(torch.load(tmp_path / files[1], weights_only=True)) == set(first.state_dict())

    def no_training(*a, **k):
        raise AssertionError("trained() retrained a cached model")

    monkeypatch.setattr(T, "train", no_training)
    second = T.trained("resnet20", **kw)
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())
    assert not second.training
    # another setting is another cache entry (so it has to train, which is patched out)
    with pytest.raises(AssertionError, match="retrained"):
        T.trained("resnet20", **{**kw, "width": 8})
    # a damaged cache entry is reported with what to do, not retrained silently
    (tmp_path / files[1]).write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="delete"):
        T.trained("resnet20", **kw)


def test_cache_key_depends_on_settings():
    base = T.cache_key("vgg_bn", 2, 0, {}, {"lr": 0.1}, {})
    assert base.startswith("vgg_bn-e2-s0-")
    assert base == T.cache_key("vgg_bn", 2, 0, {}, {"lr": 0.1}, {})
    assert base != T.cache_key("vgg_bn", 2, 0, {}, {"lr": 0.2}, {})
    assert base != T.cache_key("vgg_bn", 2, 1, {}, {"lr": 0.1}, {})
    assert set(T.DEFAULT_EPOCHS) == set(models.MODELS)
