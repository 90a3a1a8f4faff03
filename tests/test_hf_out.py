"""Hugging Face models out: uniform=True (every layer of a kind keeps the same width, passes/uniform.py) and
obafx.to_hf (the pruned module as a transformers model with an updated config) through save_pretrained and
AutoModelFor*.from_pretrained."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import obafx  # noqa: E402
from obafx import ConfigError  # noqa: E402
from tests import hf_models as H  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tests/conftest.py
ATTENTION = {"llama": "model.model.layers.{}.self_attn", "qwen2": "model.model.layers.{}.self_attn",
             "bert": "model.bert.encoder.layer.{}.attention.self"}
AUTO = {"llama": "AutoModelForCausalLM", "qwen2": "AutoModelForCausalLM", "bert": "AutoModelForSequenceClassification"}


def mlp_widths(module, name):
    suffix = "intermediate.dense.weight" if name == "bert" else "mlp.up_proj.weight"
    return [p.shape[0] for n, p in module.named_parameters() if n.endswith(suffix)]


def test_uniform_keeps_every_layer_of_a_kind_at_one_width_and_the_masking_oracle():
    model, x = H.build("llama"), H.example("llama")
    plain = obafx.compile_prune(model, x, macs=0.6)
    uniform = obafx.compile_prune(model, x, macs=0.6, uniform=True)
    assert len(set(mlp_widths(plain, "llama"))) > 1  # without it the two MLPs differ
    widths = mlp_widths(uniform, "llama")
    assert len(set(widths)) == 1 and widths[0] < 64
    rep = obafx.report(uniform)
    assert rep.masked_error < 1e-4 and abs(rep.macs_ratio - 0.6) <= 0.6 * 0.02


@pytest.mark.parametrize("name", ["llama", "qwen2", "bert"])
def test_to_hf_round_trips_through_save_and_from_pretrained(name, tmp_path):
    """Attention kept (a config derives head dims and rotary tables from head counts), MLPs pruned uniformly:
    the transformers model from the folder gives the pruned module's logits, at another batch and length."""
    model, x = H.build(name), H.example(name)
    ignore = [ATTENTION[name].format(i) for i in range(2)] + (["model.bert.pooler"] if name == "bert" else [])
    pruned = obafx.compile_prune(model, x, macs=0.75, uniform=True, ignore=ignore)
    hf = obafx.to_hf(pruned, model)
    assert hf.config.intermediate_size == mlp_widths(pruned, name)[0] < 64
    hf.save_pretrained(tmp_path)
    again = getattr(transformers, AUTO[name]).from_pretrained(tmp_path).eval()
    other = H.example(name, batch=3, seq=11, seed=1)
    with torch.no_grad():
        assert torch.allclose(again(other).logits, pruned(other), rtol=0, atol=1e-6)


@pytest.mark.slow  # three compile_prune runs
def test_to_hf_refuses_widths_a_config_cannot_hold():
    model, x = H.build("llama"), H.example("llama")
    ignore = [ATTENTION["llama"].format(i) for i in range(2)] + ["model.model.layers.0.mlp"]
    per_layer = obafx.compile_prune(model, x, channels=0.3, ignore=ignore)  # only layer 1's MLP narrows
    with pytest.raises(ConfigError, match="uniform=True"):
        obafx.to_hf(per_layer, model)
    only_heads = ["model.model.embed_tokens"] + [f"model.model.layers.{i}.mlp" for i in range(2)]
    heads_cut = obafx.compile_prune(model, x, channels=0.3, uniform=True, ignore=only_heads)
    assert heads_cut.get_parameter("model.model.layers.1.self_attn.v_proj.weight").shape[0] < 16
    with pytest.raises(ConfigError, match="attention head dims changed.*ignore="):
        obafx.to_hf(heads_cut, model)


@pytest.mark.slow  # two compile_prune runs and a round trip
def test_to_hf_expresses_a_pruned_residual_stream(tmp_path):
    """LLaMA's config has an explicit head_dim: a narrower residual stream (hidden_size) with whole heads is a
    config too, once its width is a multiple of the head count (transformers checks that): uniform=True on
    macs=0.6 cuts the stream and the MLPs here, not the head dims."""
    model, x = H.build("llama"), H.example("llama")
    with pytest.raises(ConfigError, match="not a multiple of the number of attention heads.*round_to="):
        obafx.to_hf(obafx.compile_prune(model, x, macs=0.6, uniform=True), model)  # hidden 25, 4 heads
    pruned = obafx.compile_prune(model, x, macs=0.6, uniform=True, round_to=4)
    hf = obafx.to_hf(pruned, model)
    assert hf.config.hidden_size < 32 and hf.config.head_dim == 8
    hf.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    other = H.example("llama", batch=3, seq=11, seed=1)
    with torch.no_grad():
        assert torch.allclose(again(other).logits, pruned(other), rtol=0, atol=1e-5)
