"""passes/private_copy.py: the copy every public call works on behaves like copy.deepcopy."""
import copy

import pytest
import torch
import torch.nn as nn
import torchvision

from obafx.passes import private_copy as pc


class Holder(nn.Module):
    """Containers, a tie, a hook, a plain tensor attribute and a custom object: all must be copied apart."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.layers = nn.ModuleList([nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)])
        self.table = {"scale": [1.0, 2.0]}
        self.const = torch.arange(3.0)
        self.state = type("State", (), {})()
        self.state.count = 0
        self.a.register_forward_hook(lambda m, i, o: None)


def test_the_copy_is_independent_and_keeps_ties():
    model = Holder()
    before = model.a.weight.detach().clone()
    new = pc.private_copy(model)
    assert new.b.weight is new.a.weight and new.a.weight is not model.a.weight
    assert torch.equal(new.a.weight, model.a.weight)
    for attr in ("_parameters", "_buffers", "_modules", "_forward_hooks"):
        assert getattr(new.a, attr) is not getattr(model.a, attr)
    assert new.table is not model.table and new.table["scale"] is not model.table["scale"]
    assert new.state is not model.state and new.const is not model.const
    with torch.no_grad():
        new.a.weight.add_(1.0)
        new.layers[1].running_mean.add_(1.0)
    new.table["scale"].append(3.0)
    new.a.register_forward_hook(lambda m, i, o: None)
    assert torch.equal(model.a.weight, before) and not torch.equal(model.a.weight, new.a.weight)
    assert torch.equal(model.layers[1].running_mean, torch.zeros(3))
    assert model.table["scale"] == [1.0, 2.0] and len(model.a._forward_hooks) == 1


def test_fast_and_deepcopy_paths_agree_on_a_torchvision_model():
    model = torchvision.models.densenet121(weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    fast = pc.private_copy(model)
    deep = copy.deepcopy(model)
    assert [type(m) for m in fast.modules()] == [type(m) for m in deep.modules()]
    with torch.no_grad():
        assert torch.equal(fast(x), deep(x))


class WithOwnDeepcopy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.copied = False

    def __deepcopy__(self, memo):
        new = WithOwnDeepcopy()
        new.copied = True
        return new


def test_a_module_with_its_own_deepcopy_gets_a_real_deepcopy():
    assert pc.private_copy(WithOwnDeepcopy()).copied


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.norm = nn.Linear(4, 4), nn.Linear(4, 4), nn.BatchNorm1d(4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.norm(self.b(torch.relu(self.a(x))))


def test_a_graph_module_is_deep_copied_around_fast_copies_of_its_children(monkeypatch):
    """A GraphModule has its own __deepcopy__ (rewrite and thop copy them): its children take the fast path first,
    and the result is still a deep copy: independent tensors, hooks and buffers, ties kept, same outputs."""
    gm = torch.fx.symbolic_trace(Tied().eval())
    fast = []
    real = pc._copy_module
    monkeypatch.setattr(pc, "_copy_module", lambda m, memo: fast.append(type(m)) or real(m, memo))
    new = pc.private_copy(gm)
    assert set(fast) == {nn.Linear, nn.BatchNorm1d} and isinstance(new, torch.fx.GraphModule)
    x = torch.randn(3, 4)
    assert torch.equal(new(x), gm(x)) and new.b.weight is new.a.weight
    before = gm.a.weight.detach().clone()
    new.a.register_buffer("total_ops", torch.zeros(1))  # what thop does to every module it profiles
    new.a.register_forward_hook(lambda m, i, o: None)
    with torch.no_grad():
        new.a.weight.add_(1.0)
    assert "total_ops" not in dict(gm.a.named_buffers()) and not gm.a._forward_hooks
    assert torch.equal(gm.a.weight, before) and not torch.equal(new.a.weight, before)


def test_copies_lazily_says_whether_every_tensor_is_shared_copy_on_write():
    model = Holder()
    assert pc.copies_lazily(model)
    model.layers[1].running_mean.share_memory_()  # shared memory is copied eagerly, so not every tensor is lazy
    assert not pc.copies_lazily(model)


LOADED = {  # a module whose tensors live in storage torch did not allocate itself, by how it came to be
    "torch.load": "torch.save(nn.Linear(4, 4), path); m = torch.load(path, weights_only=False)",
    "torch.load mmap": "torch.save(nn.Linear(4, 4), path); m = torch.load(path, weights_only=False, mmap=True)",
    "from_numpy": "m = nn.Linear(4, 4); m.weight = nn.Parameter(torch.from_numpy(np.ones((4, 4), np.float32)))",
    "frombuffer": "m = nn.Linear(1, 4); m.weight = nn.Parameter(torch.frombuffer(bytearray(16), "
                  "dtype=torch.float32).reshape(4, 1))",
}


def test_loaded_tensors_are_copied_eagerly_and_both_sides_stay_writable(tmp_path):
    """torch 2.14's lazy clone of such storage raises, or (torch.load) returns a clone whose first write on either
    side kills the process; one subprocess for all origins (an import of torch each), so that a crash is a
    failure naming the origin, not the end of the test run."""
    import subprocess
    import sys
    import textwrap

    per_origin = "".join(textwrap.dedent(f"""
        {LOADED[origin]}
        assert not copies_lazily(m), {origin!r}
        before = m.weight.detach().clone()
        c = private_copy(m)
        with torch.no_grad():
            c.weight.add_(1.0)
            m.weight.mul_(3.0)
        assert torch.equal(c.weight, before + 1.0) and torch.equal(m.weight, before * 3.0), {origin!r}
        print("writable:", {origin!r}, flush=True)
    """) for origin in sorted(LOADED))
    script = ("import numpy as np, torch\nfrom torch import nn\n"
              "from obafx.passes.private_copy import private_copy, copies_lazily\n"
              f"path = {str(tmp_path / 'm.pt')!r}\n" + per_origin)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    ok = [line.split(": ", 1)[1] for line in done.stdout.splitlines() if line.startswith("writable: ")]
    assert done.returncode == 0 and ok == sorted(LOADED), (done.returncode, ok, done.stderr[-2000:])


class PairState(nn.Module):
    """Like transformers 5's kernel wrappers (kernels.use_kernelized_func): a module class with its own
    __deepcopy__ and __reduce__, whose __setstate__ takes a (state, forward) pair instead of a dict."""

    def __init__(self):
        super().__init__()
        self.calls = [0]

    def __deepcopy__(self, memo):
        new = PairState()
        memo[id(self)] = new
        new.__setstate__((copy.deepcopy(self.__dict__, memo), None))
        return new

    def __reduce__(self):
        return (PairState, ())

    def __setstate__(self, state):
        state, _forward = state
        self.__dict__.update(state)


class HoldsUnregistered(nn.Module):
    """An nn.Module held as a plain attribute (not in _modules): model.modules() does not see it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.__dict__["kernel"] = PairState()


def test_an_unregistered_module_attribute_with_its_own_copy_protocol_is_copied_its_way():
    model = HoldsUnregistered()
    new = pc.private_copy(model)
    assert isinstance(new.kernel, PairState) and new.kernel is not model.kernel
    new.kernel.calls.append(1)
    assert model.kernel.calls == [0]


def test_a_transformers_llama_is_copied():
    """transformers 5 attaches kernel wrappers to LLaMA's attention modules as plain attributes."""
    transformers = pytest.importorskip("transformers")
    from tests.hf_models import build

    model = build("llama")
    new = pc.private_copy(model)
    ids = torch.randint(0, 100, (2, 6))
    with torch.no_grad():
        assert torch.equal(new(ids), model(ids))
    assert new.model.model.layers[0].self_attn.q_proj.weight is not model.model.model.layers[0].self_attn.q_proj.weight


def test_tuples_are_shared_exactly_where_deepcopy_shares_them():
    """A tuple of immutable values is the same object in a deep copy; a tuple holding a list is a new tuple with
    a new list. The fast module copy does the same."""
    model = nn.Conv2d(3, 3, 3)
    model.mixed = (1, [2, 3])
    model.nested = (1, (2, 3))
    new, deep = pc.private_copy(model), copy.deepcopy(model)
    for copied in (new, deep):
        assert copied.kernel_size is model.kernel_size and copied.nested is model.nested
        assert copied.mixed == model.mixed and copied.mixed is not model.mixed
        assert copied.mixed[1] is not model.mixed[1]


def test_empty_sets_and_dicts_are_new_objects():
    """Empty hook dicts and the non-persistent buffer set are copied apart (registering on the copy leaves the
    model alone), as deepcopy does."""
    model = nn.Sequential(nn.BatchNorm2d(3))
    new = pc.private_copy(model)
    new[0].register_buffer("scratch", torch.zeros(1), persistent=False)
    new[0].register_forward_pre_hook(lambda m, i: None)
    assert not model[0]._non_persistent_buffers_set and not model[0]._forward_pre_hooks
    assert "scratch" not in model[0]._buffers


class OwnSetstate(nn.Linear):
    """A plain module class with its own __setstate__ (allowed on the fast path: the copy calls it)."""

    def __setstate__(self, state):
        super().__setstate__(state)
        self.restored = True


def test_setstate_runs_where_it_decides_something():
    """The copy sets a module's attributes as Module.__setstate__ would: attributes an old pickle lacks are filled
    in, a class's own __setstate__ is called; parameters are leaves without autograd history, as a deep copy's."""
    old = nn.Linear(2, 3)  # no __setstate__ of its own (Conv2d has one)
    del old.__dict__["_forward_hooks_always_called"]  # a module unpickled from an old torch
    new = pc.private_copy(nn.Sequential(old, OwnSetstate(3, 2)))
    assert isinstance(new[0]._forward_hooks_always_called, dict) and "_forward_hooks_always_called" not in vars(old)
    assert new[1].restored and not hasattr(old, "restored")
    for p in new.parameters():
        assert type(p) is nn.Parameter and p.is_leaf and p.grad_fn is None and p.requires_grad
