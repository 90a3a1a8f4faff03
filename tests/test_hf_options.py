"""compile_prune(**obafx.hf_options(model)): uniform=True, keep_widths= (the head dims a transformers config cannot
express) and round_to= (hidden size a multiple of the heads), so that to_hf can write back a pruned hidden size
and MLP width at macs=0.6; and to_hf's final check of the rebuilt model's output against the pruned module."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import obafx  # noqa: E402
from obafx import ConfigError  # noqa: E402
from tests import hf_models as H  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tests/conftest.py
AUTO = {"llama": transformers.AutoModelForCausalLM, "qwen2": transformers.AutoModelForCausalLM,
        "qwen3": transformers.AutoModelForCausalLM, "mistral": transformers.AutoModelForCausalLM,
        "bert": transformers.AutoModelForSequenceClassification}
HEADS = dict({n: ("self_attn.q_proj.weight", "self_attn.v_proj.weight") for n in AUTO},
             bert=("attention.self.query.weight", "attention.self.value.weight"))


@pytest.mark.parametrize("name", sorted(AUTO))
def test_hf_options_prune_to_sixty_percent_and_round_trip(name, tmp_path):
    """macs=0.6 met within the fit's tolerance (FlopCounterMode), head dims untouched (keep_widths), the masking
    oracle, and save_pretrained -> from_pretrained gives the pruned logits at another batch size and length."""
    model, x = H.build(name), H.example(name)
    options = obafx.hf_options(model)
    assert options["uniform"] is True and options["round_to"] == 4
    pruned = obafx.compile_prune(model, x, macs=0.6, **options)
    rep = obafx.report(pruned)
    assert rep.counter == "flops" and 0.55 <= rep.macs_ratio <= 0.63, rep.macs_ratio
    assert rep.masked_error < 1e-5
    params, before = dict(pruned.named_parameters()), dict(model.named_parameters())
    heads = [n for n in params if n.endswith(HEADS[name])]
    assert len(heads) == 4 and all(params[n].shape[0] == before[n].shape[0] for n in heads)
    new = obafx.to_hf(pruned, model)
    assert new.config.intermediate_size < 64
    if name != "bert":  # BERT's head size follows its hidden size: hf_options keeps that
        assert new.config.hidden_size < 32 and new.config.hidden_size % 4 == 0 and new.config.head_dim == 8
    new.save_pretrained(tmp_path)
    back = AUTO[name].from_pretrained(tmp_path).eval()
    y = H.example(name, batch=3, seq=11, seed=1)
    with torch.no_grad():
        want, got = pruned(y), back(input_ids=y).logits
    assert ((want - got).abs().max() / want.abs().max()).item() < 1e-5


def test_keep_widths_names_parameter_dims_and_rejects_unknown_ones():
    model, x = H.build("llama"), H.example("llama")
    with pytest.raises(ConfigError, match="keep_widths entry 'model.nope:0' matches no parameter dim"):
        obafx.compile_prune(model, x, channels=0.2, keep_widths=["model.nope:0"])
    with pytest.raises(ConfigError, match="hf_options knows"):
        obafx.hf_options(H.build("gpt2"))


def test_to_hf_refuses_a_rebuilt_model_whose_output_differs():
    """A pruned module whose attention scale was edited after pruning: every shape fits the config, and the
    output check is what catches that the config does not describe its computation."""
    model, x = H.build("llama"), H.example("llama")
    pruned = obafx.compile_prune(model, x, macs=0.6, **obafx.hf_options(model))
    obafx.to_hf(pruned, model)  # the unedited module passes
    sdpa = [n for n in pruned.graph.nodes if "scaled_dot_product_attention" in str(n.target)]
    assert sdpa
    for node in sdpa:
        node.kwargs = {**node.kwargs, "scale": 0.5 * node.kwargs.get("scale", 8 ** -0.5)}
    pruned.recompile()
    with pytest.raises(ConfigError, match="output differs from the pruned module's"):
        obafx.to_hf(pruned, model)
