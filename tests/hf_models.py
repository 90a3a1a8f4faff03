"""Tiny Hugging Face transformers models built from config (no download), each behind a logits-only wrapper.

The nine architectures of issue 13: LLaMA (GQA), Qwen2, Qwen3 (q_norm/k_norm), Mistral, GPT-2 (Conv1D), BERT
(sequence classification), ViT (image classification), OPT and T5. Two layers, hidden 32, vocabulary 100.
"""
from __future__ import annotations

import torch
from torch import nn

import transformers as T

VOCAB = 100
NAMES = ("llama", "qwen2", "qwen3", "mistral", "gpt2", "bert", "vit", "opt", "t5")
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64)
_DECODER = dict(_COMMON, num_key_value_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=None)


def config(name: str, **overrides):
    """The tiny config of architecture ``name`` (``overrides``: constructor arguments of the decoder configs,
    attributes set afterwards for the others)."""
    decoder = dict(_DECODER, **overrides)
    make = {
        "llama": lambda: T.LlamaConfig(**decoder),
        "qwen2": lambda: T.Qwen2Config(**decoder),
        "qwen3": lambda: T.Qwen3Config(**dict(decoder, head_dim=decoder.get("head_dim", 8))),
        "mistral": lambda: T.MistralConfig(**decoder),
        "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=1),
        "bert": lambda: T.BertConfig(**_COMMON, num_labels=3),
        "vit": lambda: T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                   image_size=32, patch_size=8, num_labels=5),
        "opt": lambda: T.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                   bos_token_id=0, eos_token_id=1, pad_token_id=2),
        "t5": lambda: T.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
    }[name]
    cfg = make()
    cfg._attn_implementation = "sdpa"
    for k, v in overrides.items():
        if not hasattr(cfg, k) or name not in ("llama", "qwen2", "qwen3", "mistral"):
            setattr(cfg, k, v)
    return cfg


_CLASSES = {"llama": T.LlamaForCausalLM, "qwen2": T.Qwen2ForCausalLM, "qwen3": T.Qwen3ForCausalLM,
            "mistral": T.MistralForCausalLM, "gpt2": T.GPT2LMHeadModel, "bert": T.BertForSequenceClassification,
            "vit": T.ViTForImageClassification, "opt": T.OPTForCausalLM, "t5": T.T5ForConditionalGeneration}


class Logits(nn.Module):
    """``forward(x) -> model(...).logits`` with the cache off (decoder input = input ids for T5)."""

    def __init__(self, model: nn.Module, name: str):
        super().__init__()
        self.model, self.name = model, name

    def forward(self, x):
        if self.name == "vit":
            return self.model(pixel_values=x).logits
        if self.name == "bert":
            return self.model(input_ids=x).logits
        if self.name == "t5":
            return self.model(input_ids=x, decoder_input_ids=x, use_cache=False).logits
        return self.model(input_ids=x, use_cache=False).logits


def build(name: str, seed: int = 0, dtype=torch.float32, **overrides) -> Logits:
    """The wrapped tiny model in eval mode, with norm weights randomised (so that a wrong index cannot hide
    behind their initial ones)."""
    torch.manual_seed(seed)
    model = _CLASSES[name](config(name, **overrides)).to(dtype).eval()
    with torch.no_grad():
        for mod_name, p in model.named_parameters():
            if "norm" in mod_name.lower() or "layer_norm" in mod_name:
                p.add_(0.2 * torch.randn_like(p))
    return Logits(model, name).eval()


def example(name: str, batch: int = 2, seq: int = 8, seed: int = 0) -> torch.Tensor:
    """An input batch: token ids (batch, seq), or images (batch, 3, 32, 32) for ViT."""
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return torch.randn(batch, 3, 32, 32, generator=g)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)
