"""importance="oba" on a Hugging Face LLaMA captured by torch.export, with causal-LM calibration batches
(obafx.causal_lm_loss: next-token cross-entropy on the input ids)."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

pytest.importorskip("transformers")

import obafx  # noqa: E402
from obafx.passes.capture import capture  # noqa: E402
from obafx.passes.scoring import prunable_parameter_names  # noqa: E402
from tests import hf_models as H  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tests/conftest.py
TINY = dict(vocab_size=16, hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1)


def ids(batch, seq, seed, vocab=H.VOCAB):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_causal_lm_loss_is_next_token_cross_entropy_or_the_outputs_own_loss():
    logits, x = torch.randn(2, 5, 7), ids(2, 5, 0, vocab=7)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 7), x[:, 1:].reshape(-1))
    assert torch.equal(obafx.causal_lm_loss(logits, x), expected)
    with_loss = type("Out", (), {"loss": torch.tensor(3.0), "logits": logits})()
    assert obafx.causal_lm_loss(with_loss, x) == 3.0
    with pytest.raises(obafx.ScoreError, match="batch, seq, vocab"):
        obafx.causal_lm_loss(torch.randn(2, 7), x)


def test_oba_scores_on_the_exported_graph_equal_an_explicit_hessian():
    """θ ⊙ (Hθ) by Hessian-vector products on the captured graph equals θ ⊙ (Hθ) with H the explicit Hessian of
    the causal-LM loss of the eager transformers model, over every linear weight (float64 parameters, one layer)."""
    model = H.build("llama", dtype=torch.float64, **TINY)
    x = ids(2, 6, 1, vocab=16)
    traced = capture(model, x, how="export")
    names = prunable_parameter_names(traced.gm)
    assert "model.model.layers.0.mlp.up_proj.weight" in names and "model.lm_head.weight" in names
    scores = obafx.parameter_scores(traced.gm, [(x, x)], loss_fn=obafx.causal_lm_loss, mode="full")
    params = dict(model.named_parameters())
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def loss(flat):
        parts, at = {}, 0
        for n in names:
            parts[n] = flat[at:at + params[n].numel()].view_as(params[n])
            at += params[n].numel()
        return obafx.causal_lm_loss(torch.func.functional_call(model, parts, (x,)), x)

    with sdpa_kernel(SDPBackend.MATH):  # the CPU flash kernel has no double backward
        hessian = torch.autograd.functional.hessian(loss, theta)
    expected = theta * (hessian @ theta)
    got = torch.cat([scores[n].reshape(-1) for n in names])
    # transformers computes RMSNorm's variance and the rotary tables in float32 even in a float64 model, so the
    # two agree to float32 round-off, not float64's
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max(), (got - expected).abs().max()


def test_compile_prune_with_oba_on_llama_text_batches():
    model, x = H.build("llama"), ids(2, 8, 0)
    data = [(ids(4, 8, s), ids(4, 8, s)) for s in range(2)]
    pruned = obafx.compile_prune(model, x, importance="oba", data=data, loss_fn=obafx.causal_lm_loss, macs=0.6)
    rep = obafx.report(pruned)
    assert rep.importance == "oba" and rep.masked_error < 1e-4 and abs(rep.macs_ratio - 0.6) <= 0.6 * 0.02
    assert pruned(ids(3, 11, 5)).shape == (3, 11, H.VOCAB)
