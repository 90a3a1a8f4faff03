"""Which channels the op rules couple, on the small models and on label planes directly.

Each test states a coupling a correct rule must produce (or must not), so a wrong union or a missing pin fails
here with the model named, before the end-to-end oracles of test_rules_models.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import obafx
from obafx.passes import ops
from obafx.passes.channel_graph import analyze
from obafx.passes.coupling import couple
from obafx.passes.trace import trace
from obafx.passes.labels import PIN, Plane, Store, couple_facing, merge_along
from obafx.passes.plan import plan_from_removed
from obafx.passes.rules_layers import matmul_planes
from tests.prune_oracles import analyse, relative_error, random_removal
from tests.small_models import CASES


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tests/conftest.py


def _coupled(name):
    case = CASES[name]
    return analyse(case.make(), case.inputs(2))


def _group(coupling, param: str, dim: int):
    """The group holding slot (param, dim), or None when it is pinned."""
    return next((g for g in coupling.groups if (param, dim) in g.members), None)


def _kept(coupling, removed, param: str, dim: int):
    return plan_from_removed(coupling, removed).kept.get(param, {}).get(dim)


# ------------------------------------------------------------------------------------------- label helpers

def _components(store: Store) -> np.ndarray:
    parent = list(range(store.next_label))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a
    for pair in store.pairs:
        for a, b in pair.T:
            parent[find(a)] = find(b)
    return np.array([find(a) for a in range(store.next_label)])


def test_merge_along_makes_labels_independent_of_a_dim():
    store = Store()
    p = Plane((1, 2), store.fresh(12).reshape(1, 3, 4))
    reduced = merge_along(store, p, {1})
    comp = _components(store)
    assert reduced.dims == (2,) and np.all(comp[p.arr] == comp[reduced.arr])
    assert len(np.unique(comp[p.arr])) == 4


def test_facing_a_broadcast_buffer_merges_heads_not_pins():
    """(heads, head_dim) plane times a per-head-dim buffer: the same head-dim index in every head, no pin."""
    store = Store()
    q = Plane((1, 3), store.fresh(8).reshape(1, 2, 1, 4))
    cos = Plane((3,), store.fresh(4).reshape(1, 1, 1, 4))
    couple_facing(store, q, {3}, [cos])
    comp = _components(store)
    assert np.all(comp[q.arr[0, 0]] == comp[q.arr[0, 1]]) and len(np.unique(comp[q.arr])) == 4
    assert not np.any(comp[q.arr] == comp[PIN])


def test_facing_fixed_width_pins_or_merges():
    store = Store()
    one = Plane((1,), store.fresh(4).reshape(1, 4))
    two = Plane((0, 1), store.fresh(6).reshape(2, 3))
    couple_facing(store, one, {1}, [])  # only dim faces an unlabelled extent: pinned
    couple_facing(store, two, {0}, [])  # dim 0 fixed: merged along it, dim 1 stays free
    comp = _components(store)
    assert np.all(comp[one.arr] == comp[PIN])
    assert len(np.unique(comp[two.arr])) == 3 and not np.any(comp[two.arr] == comp[PIN])


def test_matmul_keeps_heads_and_couples_head_dims():
    """q (b, h, n, d) @ kᵀ (b, h, d, n): q[h, i] ~ k[h', i] for all heads; nothing about heads comes out."""
    store = Store()
    q = Plane((1, 3), store.fresh(8).reshape(1, 2, 1, 4))
    kt = Plane((1, 2), store.fresh(8).reshape(1, 2, 4, 1))
    out = matmul_planes(store, (1, 2, 5, 4), [q], (1, 2, 4, 5), [kt])
    comp = _components(store)
    assert out == ()
    assert np.array_equal(comp[q.arr[0, 0, 0]], comp[kt.arr[0, 1, :, 0]])
    assert len(np.unique(comp[q.arr])) == 4


# ----------------------------------------------------------------------------------------- model couplings

def test_residual_se_and_spatial_attention_couple_producers():
    _, _, c = _coupled("squeeze_excite")
    g = _group(c, "c1.weight", 0)
    assert ("e1.weight", 0) in g.members and ("e2.weight", 0) in g.members and ("c2.weight", 1) in g.members
    _, _, c = _coupled("spatial_attention")
    assert _group(c, "att.weight", 0) is None  # one output channel: never removable
    assert ("att.weight", 1) in _group(c, "c1.weight", 0).members


def test_free_parameters_go_with_their_channels():
    _, _, c = _coupled("free_params")
    members = _group(c, "c1.weight", 0).members
    assert ("shift", 0) in members and ("scale", 0) in members
    _, _, c = _coupled("tiny_vit")
    members = _group(c, "patch.weight", 0).members
    assert {("cls", 2), ("pos", 2), ("gamma", 0), ("fc2.weight", 0), ("head.weight", 1)} <= set(members)


def test_chunk_and_dynamic_halves_pair_positions():
    """GLU over chunk(2): row i of g goes with row i + 10; x[:, :C//2] / x[:, C//2:] keep the same indices."""
    tr, facts, c = _coupled("cat_chunk_split_slice")
    for seed in range(3):
        kept = set(_kept(c, random_removal(c, seed), "g.weight", 0) or range(20))
        assert kept == {i for i in range(20) if i % 10 in {k % 10 for k in kept}}
    tr, facts, c = _coupled("dynamic_halves")
    for seed in range(3):
        kept = set(_kept(c, random_removal(c, seed), "c1.weight", 0))
        assert kept == {i for i in range(16) if i % 8 in {k % 8 for k in kept}} and len(kept) < 16


def test_shared_module_couples_its_own_in_and_out():
    _, _, c = _coupled("shared_modules")
    g = _group(c, "sh.weight", 0)
    assert ("sh.weight", 1) in g.members and ("c1.weight", 0) in g.members
    assert ("lin.weight", 1) in _group(c, "lin.weight", 0).members


def test_functional_weights_are_layers():
    """get_attr weights of F.conv2d / F.linear / x @ W produce channels (role 'out'), so they are prunable."""
    _, _, c = _coupled("functional")
    assert c.slot_roles[("w1", 0)][0] == "out" and c.slot_roles[("w2", 0)][0] == "out"
    assert c.slot_roles[("w3", 1)][0] == "out" and c.slot_roles[("w3", 0)][0] == "in"
    assert _group(c, "w1", 0) is not None and ("w2", 1) in _group(c, "w1", 0).members
    assert ("head.weight", 1) in _group(c, "w3", 1).members


def test_int_index_keeps_only_the_selected_channel():
    _, _, c = _coupled("index_where_mT")
    g = _group(c, "c1.weight", 0)
    assert g.width == 11  # channel 5 of 12 is read by y[:, 5]
    for seed in range(3):
        kept = _kept(c, random_removal(c, seed), "c1.weight", 0)
        assert 5 in kept and len(kept) < 12
    assert ("w", 1) in _group(c, "c2.weight", 0).members  # z @ w.mT contracts w's dim 1


@pytest.mark.parametrize("name", ["attention_literal_heads", "attention_minus_one_heads", "attention_unbind"])
def test_packed_qkv_keeps_heads_and_shares_head_dims(name):
    """q, k and v of every head keep the same head-dim indices; proj's columns follow."""
    tr, facts, c = _coupled(name)
    for seed in range(3):
        removed = random_removal(c, seed)
        rows = _kept(c, removed, "qkv.weight", 0)
        cols = _kept(c, removed, "proj.weight", 1)
        dims = sorted({r % 4 for r in rows})
        assert 0 < len(dims) < 4
        assert list(rows) == [p * 16 + h * 4 + d for p in range(3) for h in range(4) for d in dims]
        assert list(cols) == [h * 4 + d for h in range(4) for d in dims]


def test_attention_scale_measured_on_head_dim_pins_qk():
    """sdpa's default scale and ``/ math.sqrt(q.size(-1))`` depend on the q/k head dim: it stays; v may go."""
    for name in ("attention_sdpa", "attention_dynamic_scale"):
        _, _, c = _coupled(name)
        assert _group(c, "q.weight", 0) is None and _group(c, "k.weight", 0) is None, name
        assert _group(c, "v.weight", 0).width == 4 and ("o.weight", 1) in _group(c, "v.weight", 0).members


def test_multihead_attention_prunes_whole_heads_with_their_input_blocks():
    """MhaNet: embed_dim 16, 4 heads of 4. A head goes with its q, k, v rows, its out_proj columns and the input
    block of the same index (the q/k/v width must equal the input width); head_dim stays."""
    for name in ("mha_batch_first", "mha_seq_first"):
        _, _, c = _coupled(name)
        heads = _group(c, "att.in_proj_weight", 0)
        assert heads.width == 4, name
        assert {("inp.weight", 0), ("att.in_proj_weight", 1), ("att.out_proj.weight", 1)} <= set(heads.members)
        assert ("mid.weight", 1) in _group(c, "att.out_proj.weight", 0).members  # output features stay free
        for seed in range(4):
            removed = random_removal(c, seed)
            blocks = {i // 4 for i in _kept(c, removed, "inp.weight", 0) or range(16)}
            expect_in = [i for i in range(16) if i // 4 in blocks]
            assert list(_kept(c, removed, "att.in_proj_weight", 1) or range(16)) == expect_in
            rows = list(_kept(c, removed, "att.in_proj_weight", 0) or range(48))
            assert rows == [i for i in range(48) if (i % 16) // 4 in blocks]


def test_pruned_multihead_attention_has_fewer_heads_of_the_same_size():
    case = CASES["mha_batch_first"]
    model, (x,) = case.make().eval(), case.inputs(2)
    pruned = obafx.compile_prune(model, x, channels=0.5, importance="magnitude", ignore=["mid"])  # heads only
    att = pruned.get_submodule("att")
    assert att.head_dim == 4 and att.num_heads < 4 and att.embed_dim == 4 * att.num_heads
    assert att.in_proj_weight.shape == (3 * att.embed_dim, att.embed_dim)
    assert pruned(x).shape == model(x).shape


def test_glu_pairs_halves_and_parameterless_norms_pass():
    """GLU: row i of its producer goes with row i + C/2. InstanceNorm / LayerNorm without parameters do not
    pin; nn.Unflatten pins the unflattened dim (rewrite keeps its unflattened_size)."""
    _, _, c = _coupled("norms_glu_unflatten")
    assert _group(c, "fc.weight", 0) is None
    for param, half in (("c1.weight", 6), ("c2.weight", 5)):
        for seed in range(3):
            kept = set(_kept(c, random_removal(c, seed), param, 0))
            assert kept == {i for i in range(2 * half) if i % half in {k % half for k in kept}} and kept
    assert ("slope", 0) in _group(c, "c1.weight", 0).members and ("c3.weight", 1) in _group(c, "c2.weight", 0).members


def test_roll_tensor_split_and_foreign_sizes_pin():
    """roll over channels and tensor_split on channels pin them, roll over space does not; a size measured on
    channels but used to view another tensor pins the measured channels."""
    _, _, c = _coupled("roll_tensor_split")
    assert _group(c, "c1.weight", 0) is None and _group(c, "c2.weight", 0) is None
    assert _group(c, "c0.weight", 0).width == 8 and _group(c, "a.weight", 0).width == 4
    _, _, c = _coupled("foreign_size")
    assert _group(c, "c1.weight", 0) is None and _group(c, "c2.weight", 0).width == 6


def test_barrier_pins_both_sides():
    _, _, c = _coupled("barrier_wrapped")
    assert _group(c, "c1.weight", 0) is None and _group(c, "c2.weight", 1) is None
    assert [b["node"] for b in c.barriers] == ["custom_op"]


class _RealAttr(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c2(self.c1(x).real)


def test_unknown_tensor_attribute_is_a_barrier():
    _, _, c = analyse(_RealAttr(), (torch.randn(2, 3, 4, 4),))
    assert c.groups == () and any(".real" in b["why"] for b in c.barriers), c.barriers


def test_a_barrier_names_the_users_source_line():
    """The report says where the barrier is in the user's code: file, line and the line's text."""
    import inspect

    _, _, c = analyse(_RealAttr(), (torch.randn(2, 3, 4, 4),))
    lines, start = inspect.getsourcelines(_RealAttr.forward)
    line = start + next(i for i, text in enumerate(lines) if ".real" in text)
    assert f'{__file__}", line {line}, in forward: return self.c2(self.c1(x).real)' in c.barriers[0]["where"]


class _Odd(nn.Module):
    def forward(self, x):
        return x + 1


class _UsesOdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.odd, self.b = nn.Linear(4, 8), _Odd(), nn.Linear(8, 2)
        self.odd.w, self.odd.v = nn.Parameter(torch.ones(8)), nn.Parameter(torch.ones(8))

    def forward(self, x):
        return self.b(self.odd(self.a(x)))


def test_a_failing_rule_leaves_no_half_unions(monkeypatch):
    """A rule that records slots and unions, then raises: its unions are forgotten, its slots pinned, the node
    becomes a barrier and nothing around it is pruned."""
    def half_then_fail(call):
        w = call.store.slot("odd.w", 0, 8, "out", "odd")
        call.store.union(w, call.store.slot("odd.v", 0, 8, "in", "odd"))
        raise ValueError("cannot model this")
    monkeypatch.setitem(ops.MODULES, _Odd, ops.op(half_then_fail))
    facts = analyze(trace(_UsesOdd(), torch.randn(3, 4), leaf_modules=[_Odd]))
    c = couple(facts)
    assert [b["node"] for b in c.barriers] == ["odd"]
    assert c.groups == ()
    assert all(int(u) == c.pinned for key in (("odd.w", 0), ("odd.v", 0)) for u in c.slot_units[key])


def test_every_zoo_rule_is_exercised():
    """The table's entries used by the zoo resolve to rules (no silent barrier in a model meant to prune)."""
    for name, case in CASES.items():
        if name.startswith("barrier"):
            continue
        _, _, c = analyse(case.make(), case.inputs(2))
        assert not c.barriers, (name, c.barriers)


class OneChannelSlice(nn.Module):
    """y[:, :1] is one channel wide: planes never carry width 1, so that channel must be pinned, not lost (fuzz
    found a second pruning step that removed it and emptied the slice while the next conv kept its input)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 5, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(torch.cat([y[:, :1], 2.0 * y[:, 1:]], dim=1)).mean((2, 3))


def test_a_one_channel_slice_keeps_its_channel():
    import obafx

    torch.manual_seed(0)
    model, x = OneChannelSlice().double(), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    coupling = couple(analyze(trace(model, x)))
    first = coupling.slot_units[("a.weight", 0)][0]
    assert first == coupling.pinned and all(first not in g.units for g in coupling.groups)
    once = obafx.compile_prune(model, x, channels=0.3)
    twice = obafx.compile_prune(once, x, channels=0.3)
    assert twice.a.weight.shape[0] < 6 and obafx.report(twice).masked_error < 1e-9
    assert twice(x).shape == (2, 5)


def test_masking_oracle_zeroes_removed_parameter_slices_without_touching_the_module():
    """Inside an opaque layer (MultiheadAttention) only zeroed parameters silence a removed head: without them
    the oracle would disagree with a correct rewrite. The traced copy is never written to (the zeroed tensors are
    new ones swapped in for the run, on every device): the same tensors, with the same values, afterwards."""
    from obafx.passes.rewrite import rewrite
    from obafx.passes.verify import masked_output

    case = CASES["mha_batch_first"]
    traced = trace(case.make().double().eval(), tuple(t.double() for t in case.inputs(2)))
    facts = analyze(traced)
    c = couple(facts)
    heads = _group(c, "att.in_proj_weight", 0)
    removed = {heads.units[0]}  # one head and its input block, nothing else
    pruned = rewrite(traced, c, facts.shapes, removed)
    before = {k: (v.clone(), v.data_ptr()) for k, v in traced.gm.state_dict().items()}
    with torch.no_grad():
        assert relative_error(masked_output(traced, c, removed), pruned(*traced.inputs)) < 1e-9
    after = traced.gm.state_dict()
    assert all(torch.equal(before[k][0], v) and before[k][1] == v.data_ptr() for k, v in after.items())


class _MhaForms(nn.Module):
    """nn.MultiheadAttention with separate k/v widths (kdim, vdim) or with bias_k/bias_v: embed_dim stays."""

    def __init__(self, separate: bool):
        super().__init__()
        self.separate = separate
        self.q, self.kv = nn.Linear(4, 8), nn.Linear(4, 5)
        self.att = (nn.MultiheadAttention(8, 2, kdim=5, vdim=5, batch_first=True) if separate
                    else nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True))
        self.mid, self.head = nn.Linear(8, 12), nn.Linear(12, 3)

    def forward(self, x):
        q = self.q(x)
        kv = self.kv(x) if self.separate else q
        y, _ = self.att(q, kv, kv)
        return self.head(torch.relu(self.mid(y)))


@pytest.mark.parametrize("separate", [True, False])
def test_other_multihead_attention_forms_keep_embed_dim_and_still_prune(separate):
    model, x = _MhaForms(separate).eval(), torch.randn(2, 6, 4)
    c = couple(analyze(trace(model, x)))
    assert not any(name.startswith("att.in_proj") or name.startswith("att.q_proj") for name, _ in c.slot_units)
    pruned = obafx.compile_prune(model, x, channels=0.5, importance="magnitude")
    assert pruned.get_submodule("att").embed_dim == 8 and pruned.get_submodule("att").num_heads == 2
    assert pruned(x).shape == model(x).shape
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
