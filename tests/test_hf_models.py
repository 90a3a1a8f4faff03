"""Nine Hugging Face transformers architectures built from tiny configs (tests/hf_models.py), pruned end to end
through the torch.export capture path: compile_prune(wrapper, ids, macs=0.6)."""
import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

pytest.importorskip("transformers")

import obafx  # noqa: E402
from obafx.passes.capture import capture  # noqa: E402
from obafx.passes.channel_graph import analyze  # noqa: E402
from obafx.passes.coupling import couple  # noqa: E402
from obafx.passes.rewrite import rewrite  # noqa: E402
from obafx.passes.verify import masked_output, max_relative_error  # noqa: E402
from tests import hf_models as H  # noqa: E402
from tests.prune_oracles import random_removal  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tests/conftest.py


def flops(model, x):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", H.NAMES)
def test_compile_prune_keeps_about_sixty_percent_of_the_flops_and_the_masking_oracle(name):
    """A smaller module; its output equals the original's with the removed slices zeroed (means and layer norms
    over a cut dim over the kept channels: the report's masked error); the user's model untouched; MACs kept in
    [0.5, 0.63] by FlopCounterMode; it runs at a second batch size and sequence length."""
    model, x = H.build(name), H.example(name)
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        before = model(x)
    pruned = obafx.compile_prune(model, x, macs=0.6)
    rep = obafx.report(pruned)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert rep.capture == "export" and rep.counter == "flops"
    assert rep.params_after < 0.75 * rep.params_before
    assert rep.masked_error < 1e-4, rep.masked_error
    assert 0.5 <= flops(pruned, x) / flops(model, x) <= 0.63
    named = dict(model.named_parameters()) | dict(model.named_buffers())
    assert rep.plan and set(rep.plan) <= set(named)  # the user's names, e.g. model.model.layers.0.mlp.up_proj.weight
    other = H.example(name, batch=3, seq=11, seed=1)  # longer than the example: no bound may stay at 8
    with torch.no_grad():
        assert pruned(other).shape == model(other).shape


def test_llama_masking_holds_at_another_batch_size_and_sequence_length():
    """Random removals in every group of a LLaMA (GQA, rotary, RMSNorm, tied residual stream): the rewritten
    module equals the masked original at the example's shape and at another one."""
    model = H.build("llama")
    traced = capture(model, H.example("llama"))
    facts = analyze(traced)
    coupling = couple(facts)
    removed = random_removal(coupling, seed=0)
    pruned = rewrite(traced, coupling, facts.shapes, removed)
    assert pruned.get_parameter("model.model.layers.1.mlp.up_proj.weight").shape[0] < 64
    for x in (traced.inputs[0], H.example("llama", batch=1, seq=11, seed=2)):
        with torch.no_grad():
            err = max_relative_error(masked_output(traced, coupling, removed, inputs=(x,)), pruned(x))
        assert err < 1e-5, err


def test_llama_groups_are_the_residual_stream_heads_and_mlps():
    """Head-dim units pair rotate_half's halves (shared rotary tables couple q/k of every layer); v/o head dims
    and each MLP are groups of their own; the residual stream is one group through embeddings and norms."""
    coupling = couple(analyze(capture(H.build("llama"), H.example("llama"))))
    widths = sorted(g.width for g in coupling.groups)
    assert widths == [4, 8, 8, 32, 64, 64], widths
    stream = next(g for g in coupling.groups if g.width == 32)
    names = {n for n, _ in stream.members}
    assert {"model.model.embed_tokens.weight", "model.model.norm.weight",
            "model.model.layers.0.input_layernorm.weight"} <= names


def test_a_pruned_llama_saves_and_loads_under_the_users_names(tmp_path):
    model, x = H.build("llama"), H.example("llama")
    pruned = obafx.compile_prune(model, x, channels=0.3)
    path = obafx.save(pruned, tmp_path / "llama.safetensors")
    again = obafx.load(path, lambda: H.build("llama", seed=1))
    other = H.example("llama", batch=3, seq=5, seed=1)
    with torch.no_grad():
        assert torch.equal(again(other), pruned(other))
    assert obafx.report(again).capture == "export"


def test_gpt2_conv1d_layout_and_tied_embeddings():
    """GPT-2's Conv1D is addmm with an [in, out] weight: an MLP's units are c_fc's columns and c_proj's rows. The
    output embedding is the input one (tied): one tensor, read by the embedding and by lm_head, narrowed once
    (torch.export names a tied tensor by one of its names at every use: here model.lm_head.weight)."""
    traced = capture(H.build("gpt2"), H.example("gpt2"))
    facts = analyze(traced)
    coupling = couple(facts)
    mlp = next(g for g in coupling.groups if ("model.transformer.h.0.mlp.c_fc.weight", 1) in g.members)
    assert mlp.width == 128 and ("model.transformer.h.0.mlp.c_proj.weight", 0) in mlp.members
    stream = next(g for g in coupling.groups if ("model.transformer.wte.weight", 1) in g.members)
    pruned = rewrite(traced, coupling, facts.shapes, set(stream.units[:5]))
    nodes = list(pruned.graph.nodes)
    tokens = {n.args[0].target for n in nodes if n.target is torch.ops.aten.embedding.default
              and pruned.get_parameter(n.args[0].target).shape[0] == H.VOCAB}
    out = nodes[-1].args[0]
    logits = {(out[0] if isinstance(out, (tuple, list)) else out).args[1].target}  # the output: lm_head's linear
    assert tokens == logits and pruned.get_parameter(logits.pop()).shape == (H.VOCAB, 27)
    x = H.example("gpt2", batch=3, seq=11, seed=3)
    with torch.no_grad():
        err = max_relative_error(masked_output(traced, coupling, set(stream.units[:5]), inputs=(x,)), pruned(x))
    assert err < 1e-5, err
