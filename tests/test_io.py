"""obafx.io save/load: a pickle-free single file that rebuilds the pruned module from the original architecture.

Oracles: bit-identical outputs and state_dicts against the module that was saved; re-applying the plan to a fresh
copy of the original (weights=False) equals the pruned module exactly (pruning only slices); files for other
architectures, tampered tensors and foreign files are refused with PlanError.
"""
import copy
import json
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import obafx
from obafx.io import load, read_header, save
from obafx.passes.errors import ConfigError, PlanError


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tests/conftest.py


class Net(nn.Module):
    """Conv-BN, a free per-channel scale, a residual add, flatten into a linear head."""

    def __init__(self, width=8, classes=5):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.c2 = nn.Conv2d(width, width, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(width, 1, 1) + 0.5)
        self.fc = nn.Linear(width * 4, classes)

    def forward(self, x):
        h = F.relu(self.bn(self.c1(x)))
        h = self.c2(h) * self.scale + h
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 2), 1))


class Renamed(Net):
    """Net with the same forward but another layer name: a different architecture for a plan."""

    def __init__(self):
        super().__init__()
        self.conv_a = self.c1
        del self.c1

    def forward(self, x):
        h = F.relu(self.bn(self.conv_a(x)))
        h = self.c2(h) * self.scale + h
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 2), 1))


class NoResidual(Net):
    """Same parameters as Net, other forward (no residual add)."""

    def forward(self, x):
        h = F.relu(self.bn(self.c1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.c2(h) * self.scale, 2), 1))


class OtherActivation(Net):
    """Same parameters and couplings as Net, another activation: only the saved graph hash can tell."""

    def forward(self, x):
        h = F.gelu(self.bn(self.c1(x)))
        h = self.c2(h) * self.scale + h
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 2), 1))


def built(cls=Net, seed=0, **kw):
    """A float64 model in eval mode with randomised BatchNorm statistics (so wrong indices show)."""
    torch.manual_seed(seed)
    m = cls(**kw).double()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.uniform_(0.5, 2)
    return m.eval()


X = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def pruned():
    return obafx.compile_prune(built(), X, channels=0.5)


@pytest.fixture(scope="module")
def pruned_steps():
    return obafx.compile_prune(built(), X, macs=0.5, steps=3)


@pytest.mark.parametrize("which", ["pruned", "pruned_steps"])
def test_round_trip_is_bit_identical(which, request, tmp_path):
    p = request.getfixturevalue(which)
    path = save(p, tmp_path / "m.safetensors", example_input=X)
    # A factory that builds other weights: every value must come from the file.
    loaded = load(path, lambda: built(seed=123))
    assert torch.equal(loaded(X), p(X))
    assert same_state(loaded, p)
    assert loaded.code == p.code
    assert obafx.report(loaded).to_dict() == obafx.report(p).to_dict()
    assert obafx.report(p).params_after < obafx.report(p).params_before  # something was pruned


def test_reapplying_plan_to_fresh_copy_reproduces_pruned_model(pruned, tmp_path):
    path = save(pruned, tmp_path / "m.safetensors", example_input=X)
    again = load(path, built(), weights=False)  # the original's weights, sliced by the saved plan
    assert same_state(again, pruned)
    assert torch.equal(again(X), pruned(X))


def test_loaded_module_accepts_other_batch_sizes_and_retraces(pruned, tmp_path):
    loaded = load(save(pruned, tmp_path / "m.safetensors", example_input=X), built())
    x5 = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    assert torch.equal(loaded(x5), pruned(x5))
    again = obafx.compile_prune(loaded, x5, channels=0.2)  # the loaded module is an ordinary traceable module
    assert obafx.report(again).params_after < obafx.report(again).params_before


def test_load_never_unpickles(pruned, tmp_path, monkeypatch):
    path = save(pruned, tmp_path / "m.safetensors", example_input=X)

    def refuse(*a, **k):
        raise AssertionError("load() must not unpickle")
    for mod, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(mod, name, refuse)
    assert torch.equal(load(path, built())(X), pruned(X))


def test_file_is_plain_safetensors_with_a_json_header(pruned, tmp_path):
    path = save(pruned, tmp_path / "m.safetensors", example_input=X)
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        header = json.loads(f.metadata()["obafx"])
    assert keys == set(pruned.state_dict())  # parameters and buffers (running stats, counters)
    assert "bn.running_var" in keys and "bn.num_batches_tracked" in keys
    assert header["plan"] == obafx.report(pruned).plan
    assert header["inputs"] == [{"kind": "tensor", "shape": [2, 3, 8, 8], "dtype": "float64"}]
    assert header["obafx_version"] == obafx.__version__
    assert read_header(path) == header


@pytest.mark.parametrize("other", [Renamed, NoResidual, lambda: Net(width=10)], ids=["renamed", "no-residual", "wider"])
def test_other_architecture_is_refused(pruned, other, tmp_path):
    path = save(pruned, tmp_path / "m.safetensors", example_input=X)
    with pytest.raises(PlanError, match="What to do"):
        load(path, lambda: other().double().eval())


def test_changed_forward_is_refused_unless_allowed(pruned, tmp_path):
    path = save(pruned, tmp_path / "m.safetensors", example_input=X)
    with pytest.raises(PlanError, match="forward differs"):
        load(path, built(OtherActivation))
    loaded = load(path, built(OtherActivation), check_graph=False)  # deliberate: the user's call
    assert same_state(loaded, pruned) and not torch.equal(loaded(X), pruned(X))


def test_model_that_cannot_run_the_saved_input_is_refused(pruned, tmp_path):
    path = save(pruned, tmp_path / "m.safetensors", example_input=X)
    with pytest.raises(PlanError, match="saved example input"):
        load(path, nn.Sequential(nn.Linear(7, 3)).double())


def test_tampered_tensor_shape_names_the_tensor_and_both_shapes(pruned, tmp_path):
    path = save(pruned, tmp_path / "m.safetensors", example_input=X)
    with safe_open(path, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    expected = tuple(tensors["fc.bias"].shape)
    tensors["fc.bias"] = torch.zeros(expected[0] + 1, dtype=torch.float64)
    save_file(tensors, tmp_path / "bad.safetensors", metadata=meta)
    with pytest.raises(PlanError) as info:
        load(tmp_path / "bad.safetensors", built())
    msg = str(info.value)
    assert "fc.bias" in msg and str(expected) in msg and str((expected[0] + 1,)) in msg and "What to do" in msg


def test_missing_tensor_is_refused(pruned, tmp_path):
    path = save(pruned, tmp_path / "m.safetensors", example_input=X)
    with safe_open(path, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys() if k != "c2.weight"}
    save_file(tensors, tmp_path / "bad.safetensors", metadata=meta)
    with pytest.raises(PlanError, match="missing.*c2.weight"):
        load(tmp_path / "bad.safetensors", built())


def test_foreign_and_corrupt_files_are_refused(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(PlanError, match="no obafx header"):
        load(tmp_path / "plain.safetensors", built())
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04not a safetensors file at all")
    with pytest.raises(PlanError, match="not a readable safetensors"):
        load(tmp_path / "junk.safetensors", built())


def test_float32_build_adopts_the_saved_float64_weights(pruned, tmp_path):
    path = save(pruned, tmp_path / "m.safetensors", example_input=X)
    loaded = load(path, Net())  # float32 fresh model
    assert all(t.dtype == pruned.state_dict()[k].dtype for k, t in loaded.state_dict().items())
    assert torch.equal(loaded(X), pruned(X))


class Tokens(nn.Module):
    """Integer token input, a pruned buffer and a frozen bias: buffers and flags round-trip."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 12)
        self.mid = nn.Linear(12, 16)
        self.out = nn.Linear(16, 12)
        self.head = nn.Linear(12, 11, bias=False)
        self.register_buffer("shift", torch.linspace(0, 1, 16))

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(self.out(torch.tanh(self.mid(h)) + self.shift))


def test_integer_inputs_flags_and_buffers(tmp_path):
    torch.manual_seed(0)
    model = Tokens().train()
    model.mid.bias.requires_grad_(False)
    ids = torch.randint(0, 11, (3, 5))
    p = obafx.compile_prune(model, ids, channels=0.5)
    assert p.training and not p.mid.bias.requires_grad
    loaded = load(save(p, tmp_path / "t.safetensors", example_input=ids), Tokens)
    assert loaded.training and not loaded.mid.bias.requires_grad and loaded.out.weight.requires_grad
    assert same_state(loaded, p) and torch.equal(loaded(ids), p(ids))
    assert loaded.shift.shape == p.shift.shape and loaded.shift.shape[0] < 16  # the buffer was pruned too


def test_tied_weights_stay_tied():
    torch.manual_seed(0)
    model = Tokens()
    model.head.weight = model.emb.weight
    ids = torch.randint(0, 11, (3, 5))
    p = obafx.compile_prune(model, ids, channels=0.5)
    assert p.head.weight is p.emb.weight
    # the tie couples emb's columns with out's rows: both shrink together and the output stays masking-exact
    assert p.emb.weight.shape[1] == p.out.weight.shape[0] < 12
    assert obafx.report(p).masked_error < 1e-5
    assert model.head.weight is model.emb.weight and model.emb.weight.shape == (11, 12)  # the user's model


@pytest.mark.parametrize("importance", ["magnitude", "oba"])
def test_tied_weights_save_and_load(tmp_path, importance):
    torch.manual_seed(0)
    model = Tokens()
    model.head.weight = model.emb.weight
    ids = torch.randint(0, 11, (4, 5))
    p = obafx.compile_prune(model, ids, channels=0.5, importance=importance)
    save(p, tmp_path / "tied.safetensors")
    fresh = Tokens()
    fresh.head.weight = fresh.emb.weight
    back = load(tmp_path / "tied.safetensors", fresh)
    assert back.head.weight is back.emb.weight
    assert torch.equal(back(ids), p(ids))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: fx cannot trace through this module
            return self.lin(x)
        return -self.lin(x)


class WithLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.gate, self.b = nn.Linear(4, 6), Untraceable(), nn.Linear(6, 3)
        self.c = nn.Linear(4, 8)
        self.d = nn.Linear(8, 3)

    def forward(self, x):
        return self.b(self.gate(self.a(x))) + self.d(torch.relu(self.c(x)))


def test_leaf_modules_are_saved_and_reused(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    p = obafx.compile_prune(WithLeaf(), x, channels=0.5, leaf_modules=[Untraceable])
    path = save(p, tmp_path / "l.safetensors", example_input=x)
    assert read_header(path)["leaf_modules"] == ["gate"]
    loaded = load(path, WithLeaf)  # no leaf_modules given: the saved ones are used
    assert torch.equal(loaded(x), p(x)) and same_state(loaded, p)


def test_save_needs_a_report_and_an_input_spec(pruned, tmp_path):
    with pytest.raises(ConfigError, match="no obafx report"):
        save(torch.fx.symbolic_trace(Net()), tmp_path / "x.safetensors")
    if getattr(obafx.report(pruned), "inputs", None):  # the report records the input: no argument needed
        assert read_header(save(pruned, tmp_path / "y.safetensors"))["inputs"][0]["shape"] == [2, 3, 8, 8]
    else:
        with pytest.raises(ConfigError, match="example_input"):
            save(pruned, tmp_path / "y.safetensors")


def test_user_example_input_overrides_the_saved_spec(pruned, tmp_path):
    path = save(pruned, tmp_path / "m.safetensors", example_input=X)
    x1 = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    loaded = load(path, built(), example_input=x1)
    assert torch.equal(loaded(X), pruned(X))


def test_copy_of_loaded_module_keeps_its_report(pruned, tmp_path):
    loaded = load(save(pruned, tmp_path / "m.safetensors", example_input=X), built())
    assert obafx.report(copy.deepcopy(loaded)).plan == obafx.report(pruned).plan


class GroupedTail(nn.Module):
    """A residual stream of 4 channels feeding a conv with groups=2: once one channel pair is gone, the conv has one
    input channel per group and a later step may drop a whole group, which no union of the ORIGINAL units can say."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.a, self.b = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(6, 4, 1)
        self.g = nn.Conv2d(4, 10, 1, groups=2)
        self.fc = nn.Linear(10, 4)

    def forward(self, x):
        h = self.stem(x)
        h = self.b(torch.relu(self.a(h))) + h
        return self.fc(self.g(h).mean((2, 3)))


def test_multi_step_plan_that_original_units_cannot_express_still_loads(tmp_path):
    from obafx.passes.channel_graph import analyze
    from obafx.passes.coupling import couple
    from obafx.passes.facts import PrunePlan
    from obafx.passes.plan import plan_from_removed, removed_from_plan
    from obafx.passes.rewrite import rewrite
    from obafx.passes.trace import Traced, trace
    from obafx.report import Report, attach

    torch.manual_seed(0)
    model, x = GroupedTail().double().eval(), torch.randn(2, 1, 6, 6, dtype=torch.float64)
    current, plan = trace(model, x), PrunePlan()
    for _ in range(2):  # two steps, each removing the unit of the first remaining stem channel
        facts = analyze(current)
        coupling = couple(facts)
        removed = {int(coupling.slot_units[("stem.weight", 0)][0])}
        plan = plan.compose(plan_from_removed(coupling, removed))
        current = Traced(rewrite(current, coupling, facts.shapes, removed), current.inputs)
    pruned = current.gm
    assert pruned.g.in_channels == 1 and pruned.g.out_channels == 5  # a whole group went in step 2
    with pytest.raises(PlanError):
        removed_from_plan(couple(analyze(trace(model, x))), plan)  # not expressible in one shot
    params = sum(p.numel() for p in model.parameters())
    attach(pruned, Report(params_before=params, params_after=sum(p.numel() for p in pruned.parameters()),
                          macs_before=1.0, macs_after=1.0, importance="manual", steps=2, groups=[], barriers=[],
                          plan=plan.to_dict()))
    loaded = load(save(pruned, tmp_path / "g.safetensors", example_input=x), GroupedTail)
    assert torch.equal(loaded(x), pruned(x)) and same_state(loaded, pruned) and loaded.code == pruned.code
    again = load(tmp_path / "g.safetensors", model, weights=False)
    assert same_state(again, pruned)


def test_plan_that_splits_a_coupled_group_is_refused(pruned, tmp_path):
    path = save(pruned, tmp_path / "m.safetensors", example_input=X)
    with safe_open(path, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta["obafx"])
    kept = header["plan"]["c2.weight"]["0"]
    other = [i for i in range(8) if i not in kept][: len(kept)]
    header["plan"]["c2.weight"]["0"] = other  # c2's outputs are added to c1's: they must keep the same channels
    save_file(tensors, tmp_path / "bad.safetensors", metadata={"obafx": json.dumps(header)})
    with pytest.raises(PlanError, match="coupled"):
        load(tmp_path / "bad.safetensors", built())
