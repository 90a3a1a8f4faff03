"""LLaMA-style blocks in plain torch (tests/small_llama.py): q/k/v/o without bias, grouped-query attention
(repeat_kv by expand+reshape, repeat_interleave, or sdpa's enable_gqa), rotary embeddings with rotate_half,
RMSNorm (nn.RMSNorm, F.rms_norm, hand-written), SwiGLU.

obafx keeps every head and removes the same head-dim indices in every head (q/k share theirs, v/o share
theirs); rotate_half pairs index d with d + head_dim/2, so they go together and inv_freq loses the pair's
frequency. RMSNorm over the residual stream mixes channels, so masking equivalence is checked on removals
that leave the residual stream alone; removals touching it are checked for running, shapes, parameter
arithmetic and re-trace.
"""
from __future__ import annotations

import pytest

from obafx.passes.plan import plan_from_removed
from obafx.passes.rewrite import rewrite
from tests.prune_oracles import analyse, check_compile, check_keep_all, check_removal, random_removal, run
from tests import small_llama as SL

CONFIGS = {
    "hf_repeat_kv": SL.Config(),
    "repeat_interleave": SL.Config(repeat="interleave"),
    "sdpa_enable_gqa": SL.Config(repeat="sdpa"),
    "hand_rmsnorm": SL.Config(norm="hand"),
    "functional_rmsnorm": SL.Config(norm="functional", literal_heads=True),
}


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tests/conftest.py


def _residual_free(coupling, removed):
    """The removed units of groups that do not touch a norm (the residual stream stays)."""
    inner = {u for g in coupling.groups if not any("norm" in n for n, _ in g.members) for u in g.units}
    return removed & inner


@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_removals(name):
    c = CONFIGS[name]
    tr, facts, coupling = analyse(SL.make(c), (SL.ids(2, 6),))
    assert not coupling.barriers, coupling.barriers
    check_keep_all(tr, facts, coupling)
    for seed in range(2):
        removed = random_removal(coupling, seed)
        inner = _residual_free(coupling, removed)
        assert inner and inner != removed  # both kinds of units were drawn
        pruned = check_removal(tr, facts, coupling, inner, (SL.ids(3, 5),), exact=True)
        _check_heads(pruned, c, plan_from_removed(coupling, inner))
        pruned = check_removal(tr, facts, coupling, removed, (SL.ids(3, 5),), exact=False)
        _check_heads(pruned, c, plan_from_removed(coupling, removed))


def _check_heads(pruned, c: SL.Config, plan) -> None:
    """Heads stay whole and consistent: every head keeps the same head-dim indices, q and k the same ones,
    rotary pairs (d, d + D/2) together, inv_freq the pairs' frequencies; v and o the same v indices."""
    half = c.head_dim // 2
    inv = plan.kept.get("rotary.inv_freq", {}).get(0, tuple(range(half)))
    qk = sorted(set(inv) | {d + half for d in inv})
    assert len(pruned.rotary.inv_freq) == len(inv)
    for i in range(c.layers):
        pre = f"layers.{i}.self_attn."
        a = pruned.get_submodule(pre[:-1])
        assert _per_head(plan, pre + "q_proj.weight", 0, c.heads, c.head_dim) == qk
        assert _per_head(plan, pre + "k_proj.weight", 0, c.kv_heads, c.head_dim) == qk
        dv = _per_head(plan, pre + "v_proj.weight", 0, c.kv_heads, c.head_dim)
        assert _per_head(plan, pre + "o_proj.weight", 1, c.heads, c.head_dim) == dv
        assert a.q_proj.out_features == c.heads * len(qk) and a.k_proj.out_features == c.kv_heads * len(qk)
        assert a.v_proj.out_features == c.kv_heads * len(dv) and a.o_proj.in_features == c.heads * len(dv)


def _per_head(plan, name: str, dim: int, heads: int, head_dim: int):
    """The kept head-dim indices, asserting that every head keeps the same ones."""
    kept = plan.kept.get(name, {}).get(dim, tuple(range(heads * head_dim)))
    sets = [sorted(i % head_dim for i in kept if i // head_dim == h) for h in range(heads)]
    assert all(s == sets[0] for s in sets), sets
    return sets[0]


def test_attention_inner_dims_are_pruned():
    """q/k (in rotary pairs, shared by all layers through inv_freq), v/o per layer and the MLP are prunable."""
    c = CONFIGS["hf_repeat_kv"]
    tr, facts, coupling = analyse(SL.make(c), (SL.ids(2, 6),))
    by_member = {n: g for g in coupling.groups for n, _ in g.members}
    qk = by_member["layers.0.self_attn.q_proj.weight"]
    assert qk is by_member["layers.1.self_attn.k_proj.weight"] is by_member["rotary.inv_freq"]
    assert qk.width == c.head_dim // 2
    assert by_member["layers.0.self_attn.v_proj.weight"].width == c.head_dim
    assert by_member["layers.1.mlp.up_proj.weight"].width == c.hidden
    assert by_member["norm.weight"] is by_member["embed_tokens.weight"]  # the residual stream


def test_pruned_attention_has_integer_heads():
    """ShapeProp on the pruned module: every 4-D attention tensor has the original head count."""
    c = CONFIGS["repeat_interleave"]
    tr, facts, coupling = analyse(SL.make(c), (SL.ids(2, 6),))
    pruned = rewrite(tr, coupling, facts.shapes, random_removal(coupling, 3))
    from torch.fx.passes.shape_prop import ShapeProp
    ShapeProp(pruned).propagate(SL.ids(2, 6))
    seen = set()
    for node in pruned.graph.nodes:  # q/k/v.view(b, n, heads, head_dim)
        meta = node.meta.get("tensor_meta")
        if node.op == "call_method" and node.target == "view" and len(meta.shape) == 4:
            seen.add(meta.shape[2])
            assert meta.shape[3] < c.head_dim
    assert seen == {c.heads, c.kv_heads}


@pytest.mark.parametrize("budget", [dict(channels=0.4), dict(macs=0.6)], ids=["channels", "macs"])
def test_compile_prune_llama(budget):
    model = SL.make(CONFIGS["hf_repeat_kv"])
    pruned = check_compile(model, (SL.ids(2, 6),), exact=False, **budget)
    assert run(pruned, (SL.ids(3, 5),)).shape == (3, 5, SL.Config().vocab)


def test_compile_prune_llama_residual_kept_is_exact():
    """With the residual stream kept (ignore the embedding that produces it), masking is exact."""
    pruned = check_compile(SL.make(CONFIGS["sdpa_enable_gqa"]), (SL.ids(2, 6),), exact=True, channels=0.4,
                           ignore=["embed_tokens"])
    assert pruned.embed_tokens.embedding_dim == SL.Config().dim
    assert pruned.get_submodule("layers.0.mlp.up_proj").out_features < SL.Config().hidden


def test_rotate_half_pairs_are_kept_together():
    c = CONFIGS["hand_rmsnorm"]
    tr, facts, coupling = analyse(SL.make(c), (SL.ids(2, 6),))
    for seed in range(4):
        plan = plan_from_removed(coupling, random_removal(coupling, seed, 0.5, 0.7))
        kept = set(_per_head(plan, "layers.1.self_attn.q_proj.weight", 0, c.heads, c.head_dim))
        half = c.head_dim // 2
        assert kept == {d for d in range(c.head_dim) if (d % half) in {k % half for k in kept}}
        assert len(kept) < c.head_dim
