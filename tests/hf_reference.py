"""Tiny random Hugging Face reference models (PyTorch, float32) for parity tests."""

from __future__ import annotations

import pathlib

import numpy as np
import torch
import transformers

TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False)

FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(
        **TINY, rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 32}),
    "qwen2": lambda: transformers.Qwen2Config(**{**TINY, "tie_word_embeddings": True}),
    "qwen3": lambda: transformers.Qwen3Config(**TINY),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **{**TINY, "tie_word_embeddings": True}, sliding_window=5, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
}


def make_reference(family: str, folder: pathlib.Path, seed: int = 0) -> transformers.PreTrainedModel:
    """A randomly initialised HF model of `family` (every tensor random, norms and biases too), saved to `folder`."""
    torch.manual_seed(seed)
    config = FAMILIES[family]()
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.2)
    model.save_pretrained(folder)
    return model


def reference_logits(model, tokens: np.ndarray, attention_mask: np.ndarray | None = None,
                     position_ids: np.ndarray | None = None) -> np.ndarray:
    kwargs = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(attention_mask)
    if position_ids is not None:
        kwargs["position_ids"] = torch.as_tensor(position_ids)
    with torch.no_grad():
        return model(torch.as_tensor(tokens), **kwargs).logits.numpy()
