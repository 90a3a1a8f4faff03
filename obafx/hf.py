"""Helpers for Hugging Face transformers models: the calibration loss of a causal language model, and the pruned
module written back as a transformers model (to_hf).

A transformers model captured by torch.export (compile_prune's capture="auto"/"export") prunes like any other;
what it needs besides is a loss for data-driven scores (importance="oba", "taylor", ...) on text batches, and a way
back to save_pretrained / from_pretrained when its config can express the pruned widths.
"""
from __future__ import annotations

import copy
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from obafx.passes.errors import ConfigError, ScoreError
from obafx.passes.tensors import eval_mode


def causal_lm_loss(output: Any, input_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy: the logits at position t predict ``input_ids[:, t + 1]`` (mean over tokens).

    ``output``: the model's output: a logits tensor (batch, seq, vocab), an object with ``.logits``, or one with
    ``.loss`` (a transformers output when labels were given: that loss is returned as it is). Use it as
    ``compile_prune(..., importance="oba", data=[(ids, ids), ...], loss_fn=obafx.causal_lm_loss)``.
    """
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    logits = getattr(output, "logits", output)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or not isinstance(input_ids, torch.Tensor):
        raise ScoreError("causal_lm_loss needs logits shaped (batch, seq, vocab) and the input ids as targets. "
                         "What to do: pass batches as (input_ids, input_ids) pairs to a model returning logits.")
    if logits.shape[1] < 2:
        raise ScoreError("causal_lm_loss needs sequences of at least 2 tokens (one to predict the next).")
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab), input_ids[:, 1:].reshape(-1))


_MLP_ROWS = ("mlp.up_proj.weight", "intermediate.dense.weight", "mlp.fc1.weight", "mlp.c_fc.weight")
_HEAD_ROWS = tuple(f"self_attn.{p}_proj.weight" for p in "qkv") + tuple(f"attention.self.{p}.weight"
                                                                       for p in ("query", "key", "value"))


def to_hf(pruned: nn.Module, original: nn.Module, example: Any = None, rtol: float = 1e-4) -> nn.Module:
    """The pruned module as a transformers model of the original's class with an updated config (hidden_size,
    intermediate_size), ready for ``save_pretrained`` / ``from_pretrained``. ``original``: the transformers model
    that was pruned, or a module holding it (a wrapper whose submodule it is); ``pruned``: what compile_prune
    returned for it (parameter names are the original's, so the weights map one to one).

    Raises ConfigError where a config cannot express the result: MLP widths that differ per layer (prune with
    uniform=True), attention head dims that changed (keep them: ignore=[each layer's attention module]), or any
    other width no config field holds, or where the rebuilt model's output on ``example`` (default: a random input
    shaped like compile_prune's example, token ids below the vocabulary size) differs from ``pruned``'s by more than
    ``rtol`` relative to its largest |value| (a computation the config does not describe).
    """
    prefix, hf = _find_hf(original)
    state = {k[len(prefix):]: v for k, v in pruned.state_dict().items() if k.startswith(prefix)}
    embed = _name_of(hf, hf.get_input_embeddings().weight)
    widths = {int(v.shape[0]) for k, v in state.items() if k.endswith(_MLP_ROWS)}
    if len(widths) > 1:
        raise ConfigError(f"the pruned MLPs have different widths per layer ({sorted(widths)}); a transformers "
                          "config holds one intermediate_size. What to do: prune with uniform=True (or "
                          "**obafx.hf_options(model), which sets it).")
    original_state = hf.state_dict()
    changed = [k for k, v in state.items() if k.endswith(_HEAD_ROWS) and v.shape[0] != original_state[k].shape[0]]
    if changed:
        raise ConfigError(f"attention head dims changed ({changed[0]}: {tuple(original_state[changed[0]].shape)} -> "
                          f"{tuple(state[changed[0]].shape)}); a transformers config derives them (and the rotary "
                          "tables) from head counts. What to do: keep them with ignore=[each layer's attention "
                          "module], e.g. 'model.layers.0.self_attn', or with **obafx.hf_options(model) (keep_widths= the head "
                          "dims only, so the hidden size can still shrink).")
    sizes = {"hidden_size": int(state[embed].shape[1])}
    sizes.update(_head_dim(hf, original_state, sizes["hidden_size"]))
    if widths and hasattr(hf.config, "intermediate_size"):
        sizes["intermediate_size"] = widths.pop()
    new = _rebuilt(hf, sizes)
    expected = new.state_dict()
    wrong = [k for k, v in state.items() if k in expected and tuple(expected[k].shape) != tuple(v.shape)]
    missing = [k for k in expected if k not in state]
    if wrong or missing:
        name = (wrong or missing)[0]
        raise ConfigError(f"the updated config cannot express the pruned '{name}' (pruned {_shape(state, name)}, "
                          f"config gives {tuple(expected[name].shape)}). What to do: prune with uniform=True and "
                          "keep widths no config field holds (ignore=[...], keep_widths=[...]; obafx.hf_options(model) "
                          "gives both for known architectures).")
    new.load_state_dict({k: v for k, v in state.items() if k in expected})
    _check_output(pruned, _swapped(original, prefix.rstrip("."), new), example, new.config, rtol)
    return new


_KEEP = {"decoder": ["*.self_attn.q_proj.weight:0", "*.self_attn.v_proj.weight:0"],
         "bert": ["*.attention.self.query.weight:0", "*.attention.self.value.weight:0",
                  "*.embeddings.word_embeddings.weight:1", "*.pooler.dense.weight:0"]}
_FAMILY = {"llama": "decoder", "qwen2": "decoder", "qwen3": "decoder", "mistral": "decoder", "bert": "bert"}


def hf_options(model: nn.Module) -> dict:
    """compile_prune options under which a transformers ``model`` (or a wrapper holding one) prunes only widths its
    config can express, for to_hf: ``uniform=True``; ``keep_widths``: the parameter dims no config field holds
    (LLaMA-like decoders: the query/key and value head dims, whose rotary tables and head_dim the config derives;
    BERT: the head dims, and the hidden size and pooler, which its head size follows); ``round_to``: the number of
    attention heads (transformers asks the hidden size to be a multiple of it). Use as
    ``compile_prune(model, x, macs=0.6, **obafx.hf_options(model))``."""
    _, hf = _find_hf(model)
    family = _FAMILY.get(getattr(hf.config, "model_type", None))
    if family is None:
        raise ConfigError(f"hf_options knows {sorted(_FAMILY)}, not {getattr(hf.config, 'model_type', None)!r}. "
                          "What to do: pass uniform=True and keep_widths=[...] yourself.")
    return {"uniform": True, "keep_widths": list(_KEEP[family]), "round_to": int(hf.config.num_attention_heads)}


def _swapped(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """``root`` with the submodule at ``path`` replaced by ``new``: shallow copies along the path, so the user's
    module is untouched."""
    if not path:
        return new
    head, _, rest = path.partition(".")
    shell = copy.copy(root)
    shell._modules = dict(root._modules)
    shell._modules[head] = _swapped(root._modules[head], rest, new)
    return shell


def _check_output(pruned: nn.Module, rebuilt: nn.Module, example: Any, config: Any, rtol: float) -> None:
    """Run both on ``example`` (or a random input like compile_prune's) and compare the first output tensor."""
    inputs = example if isinstance(example, tuple) else (example,) if example is not None else _probe(pruned, config)
    with eval_mode(pruned), torch.no_grad():
        want, got = _first_tensor(pruned(*inputs)), _first_tensor(rebuilt(*inputs))
    err = float((want - got).abs().max() / want.abs().max().clamp_min(1e-12)) if want.shape == got.shape else 1.0
    if err > rtol:
        raise ConfigError(f"the rebuilt {config.model_type} model's output differs from the pruned module's (relative "
                          f"error {err:.3g} > {rtol}): the config does not describe the pruned computation (e.g. an "
                          "attention scale or rotary table that follows a pruned head_dim). What to do: prune with "
                          "compile_prune(..., **obafx.hf_options(model)).")


def _probe(pruned: nn.Module, config: Any) -> Tuple[Any, ...]:
    """Random inputs shaped like compile_prune's example (integer tensors: ids below the vocabulary size)."""
    from obafx.report import report

    g = torch.Generator().manual_seed(0)
    out = []
    for spec in report(pruned).inputs:
        if spec["kind"] != "tensor":
            out.append(spec.get("value"))
            continue
        dtype = getattr(torch, spec["dtype"])
        if dtype.is_floating_point:
            out.append(torch.randn(spec["shape"], generator=g).to(dtype))
        else:
            out.append(torch.randint(0, getattr(config, "vocab_size", 2), spec["shape"], generator=g).to(dtype))
    return tuple(out)


def _first_tensor(value: Any) -> torch.Tensor:
    """The logits of a transformers output, or the first tensor of a tuple, or the tensor itself."""
    value = getattr(value, "logits", value)
    while isinstance(value, (tuple, list)):
        value = value[0]
    return value


def _head_dim(hf: nn.Module, original_state, hidden: int) -> dict:
    """{"head_dim": the original one} where the config would otherwise derive it from a changed hidden size
    (Qwen2's config has no head_dim field; its attention reads ``config.head_dim`` when present)."""
    heads = getattr(hf.config, "num_attention_heads", None)
    if not heads or hidden == hf.config.hidden_size or getattr(hf.config, "head_dim", None):
        return {}
    rows = [v.shape[0] for k, v in original_state.items() if k.endswith("self_attn.q_proj.weight")]
    return {"head_dim": int(rows[0]) // int(heads)} if rows else {}


def _rebuilt(hf: nn.Module, sizes) -> nn.Module:
    """A fresh model of ``hf``'s class and dtype from its config with ``sizes`` changed; ConfigError where
    transformers refuses the config (e.g. a hidden size that is no multiple of the head count)."""
    config = copy.deepcopy(hf.config)
    try:
        for key, value in sizes.items():
            setattr(config, key, value)
        if hasattr(config, "validate"):  # from_pretrained validates; a folder it would refuse is no result
            config.validate()
        return type(hf)(config).to(next(hf.parameters()).dtype).eval()
    except Exception as exc:  # transformers validates configs with ValueError and its own validation errors
        first = (str(exc).strip().splitlines() or [""])[-1].strip()
        raise ConfigError(f"transformers refuses the pruned config {sizes}: {first} What to do: keep widths "
                          "the config can hold, e.g. round_to=<number of attention heads> for the hidden size.") from exc


def _find_hf(module: nn.Module) -> Tuple[str, nn.Module]:
    """(name prefix, the transformers model): ``module`` itself or its first submodule with a config."""
    for name, m in module.named_modules():
        if hasattr(m, "config") and hasattr(m, "save_pretrained") and hasattr(m, "get_input_embeddings"):
            return (f"{name}." if name else ""), m
    raise ConfigError(f"{type(module).__name__} holds no transformers model (a module with .config and "
                      ".save_pretrained). What to do: pass the transformers model that was pruned, or its wrapper.")


def _name_of(module: nn.Module, tensor: torch.Tensor) -> str:
    return next(n for n, p in module.named_parameters() if p is tensor)


def _shape(state, name):
    return tuple(state[name].shape) if name in state else "absent"
