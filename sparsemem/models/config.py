"""One config dataclass for every supported decoder family, with presets.

A family is a set of flags, not a subclass: Llama-3.x, Qwen2.5, Qwen3 and Gemma-3
differ only in biases, norms, RoPE, activation and attention windows, all of which
are fields here. `from_hf_config` reads a Hugging Face `config.json` dict.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

Family = Literal["llama", "qwen2", "qwen3", "gemma3"]
LayerType = Literal["global", "local"]
AttentionImpl = Literal["auto", "xla", "cudnn"]
ATTENTION_IMPLS: tuple[AttentionImpl, ...] = ("auto", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: Llama-3.1 style (`llama3`) or plain `linear`."""

    kind: Literal["llama3", "linear"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer."""

    family: Family
    vocab_size: int
    d_model: int
    d_ff: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    # Gemma-3: sliding-window ("local") layers use their own RoPE base and window.
    local_rope_theta: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[LayerType, ...] = ()
    qkv_bias: bool = False
    qk_norm: bool = False
    # RMSNorm scale is `weight + norm_offset` (Gemma stores w with 1+w applied).
    norm_offset: float = 0.0
    # Gemma-3 "sandwich" norms after attention and after the MLP.
    post_norms: bool = False
    activation: Literal["silu", "gelu_tanh"] = "silu"
    scale_embeddings: bool = False
    # Attention logits are multiplied by query_pre_attn_scalar ** -0.5 (default head_dim).
    query_pre_attn_scalar: float | None = None
    tie_embeddings: bool = False
    max_seq_len: int = 8192
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 0
    # The attention kernel (`layers.attention_kernel`): "auto" picks cuDNN's fused kernel on CUDA at
    # bfloat16/float16 compute without a KV cache, and the float32-scores XLA `attend` otherwise. A
    # runtime choice, not part of the architecture: Hugging Face configs do not carry it.
    attention_impl: AttentionImpl = "auto"

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("global",) * self.num_layers)
        problems = []
        if len(self.layer_types) != self.num_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if "local" in self.layer_types and not self.sliding_window:
            problems.append("local layers need sliding_window > 0")
        if self.attention_impl not in ATTENTION_IMPLS:
            problems.append(f"attention_impl={self.attention_impl!r} must be one of {', '.join(ATTENTION_IMPLS)}")
        if problems:
            raise ValueError("Invalid ModelConfig: " + "; ".join(problems))

    @property
    def group_size(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    @property
    def attn_scale(self) -> float:
        return 1.0 / math.sqrt(self.query_pre_attn_scalar or self.head_dim)

    @property
    def is_local(self) -> tuple[bool, ...]:
        return tuple(t == "local" for t in self.layer_types)

    def replace(self, **changes: Any) -> "ModelConfig":
        if "num_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = _gemma_layer_types(changes["num_layers"]) if self.family == "gemma3" else ()
        return dataclasses.replace(self, **changes)


def layer_shapes(cfg: ModelConfig, heads: int | None = None, kv_heads: int | None = None,
                 neurons: int | None = None) -> dict[str, tuple[int, ...]]:
    """Shape of each weight of one transformer block (no layer axis), by the decoder's weight names.

    `heads`, `kv_heads`, `neurons` give a compacted block's kept widths (default: all units).
    Only the weights this architecture has are listed (post norms, q/k/v bias, q/k norm).
    """
    d, dh = cfg.d_model, cfg.head_dim
    h = cfg.num_heads if heads is None else heads
    kv = cfg.num_kv_heads if kv_heads is None else kv_heads
    f = cfg.d_ff if neurons is None else neurons
    shapes = {"attn_norm": (d,), "mlp_norm": (d,)}
    if cfg.post_norms:
        shapes.update(attn_post_norm=(d,), mlp_post_norm=(d,))
    shapes.update(wq=(d, h, dh), wk=(d, kv, dh), wv=(d, kv, dh), wo=(h, dh, d))
    if cfg.qkv_bias:
        shapes.update(bq=(h, dh), bk=(kv, dh), bv=(kv, dh))
    if cfg.qk_norm:
        shapes.update(q_norm=(dh,), k_norm=(dh,))
    shapes.update(w_gate=(d, f), w_up=(d, f), w_down=(f, d))
    return shapes


def _gemma_layer_types(num_layers: int, pattern: int = 6) -> tuple[LayerType, ...]:
    """Every `pattern`-th layer is global, the rest use the sliding window."""
    return tuple("global" if (i + 1) % pattern == 0 else "local" for i in range(num_layers))


_LLAMA3_SCALING_32 = RopeScaling("llama3", factor=32.0)
_LLAMA3_SCALING_8 = RopeScaling("llama3", factor=8.0)

PRESETS: dict[str, ModelConfig] = {
    "llama-3.2-1b": ModelConfig(
        family="llama", vocab_size=128_256, d_model=2048, d_ff=8192, num_layers=16, num_heads=32,
        num_kv_heads=8, head_dim=64, norm_eps=1e-5, rope_theta=500_000.0, rope_scaling=_LLAMA3_SCALING_32,
        tie_embeddings=True, max_seq_len=131_072, bos_id=128_000, eos_id=128_001, pad_id=128_004),
    "llama-3.2-3b": ModelConfig(
        family="llama", vocab_size=128_256, d_model=3072, d_ff=8192, num_layers=28, num_heads=24,
        num_kv_heads=8, head_dim=128, norm_eps=1e-5, rope_theta=500_000.0, rope_scaling=_LLAMA3_SCALING_32,
        tie_embeddings=True, max_seq_len=131_072, bos_id=128_000, eos_id=128_001, pad_id=128_004),
    "llama-3.1-8b": ModelConfig(
        family="llama", vocab_size=128_256, d_model=4096, d_ff=14_336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, norm_eps=1e-5, rope_theta=500_000.0, rope_scaling=_LLAMA3_SCALING_8,
        tie_embeddings=False, max_seq_len=131_072, bos_id=128_000, eos_id=128_001, pad_id=128_004),
    "qwen2.5-3b": ModelConfig(
        family="qwen2", vocab_size=151_936, d_model=2048, d_ff=11_008, num_layers=36, num_heads=16,
        num_kv_heads=2, head_dim=128, norm_eps=1e-6, rope_theta=1_000_000.0, qkv_bias=True,
        tie_embeddings=True, max_seq_len=32_768, bos_id=151_643, eos_id=151_643, pad_id=151_643),
    "qwen2.5-7b": ModelConfig(
        family="qwen2", vocab_size=152_064, d_model=3584, d_ff=18_944, num_layers=28, num_heads=28,
        num_kv_heads=4, head_dim=128, norm_eps=1e-6, rope_theta=1_000_000.0, qkv_bias=True,
        tie_embeddings=False, max_seq_len=32_768, bos_id=151_643, eos_id=151_643, pad_id=151_643),
    "qwen3-0.6b": ModelConfig(
        family="qwen3", vocab_size=151_936, d_model=1024, d_ff=3072, num_layers=28, num_heads=16,
        num_kv_heads=8, head_dim=128, norm_eps=1e-6, rope_theta=1_000_000.0, qk_norm=True,
        tie_embeddings=True, max_seq_len=40_960, bos_id=151_643, eos_id=151_645, pad_id=151_643),
    "gemma-3-270m": ModelConfig(
        family="gemma3", vocab_size=262_144, d_model=640, d_ff=2048, num_layers=18, num_heads=4,
        num_kv_heads=1, head_dim=256, norm_eps=1e-6, rope_theta=1_000_000.0, local_rope_theta=10_000.0,
        sliding_window=512, layer_types=_gemma_layer_types(18), qk_norm=True, norm_offset=1.0,
        post_norms=True, activation="gelu_tanh", scale_embeddings=True, query_pre_attn_scalar=256,
        tie_embeddings=True, max_seq_len=32_768, bos_id=2, eos_id=1, pad_id=0),
}


def preset(name: str) -> ModelConfig:
    """Look up a preset by name, listing the known ones if it is unknown."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"Unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None


# ---------------------------------------------------------------------------
# Hugging Face config.json <-> ModelConfig
# ---------------------------------------------------------------------------

_HF_MODEL_TYPES: dict[str, Family] = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}


def _rope_params(hf: dict[str, Any], layer_kind: str | None = None) -> dict[str, Any]:
    """RoPE settings from either transformers-5 `rope_parameters` or legacy keys."""
    params = hf.get("rope_parameters") or {}
    if layer_kind is not None and layer_kind in params:
        params = params[layer_kind]
    elif layer_kind is not None and params and all(isinstance(v, dict) for v in params.values()):
        params = {}
    merged = dict(hf.get("rope_scaling") or {}) if layer_kind in (None, "full_attention") else {}
    merged.update(params)
    return merged


def _rope_scaling(params: dict[str, Any]) -> RopeScaling | None:
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind == "llama3":
        return RopeScaling("llama3", factor=float(params["factor"]),
                           low_freq_factor=float(params["low_freq_factor"]),
                           high_freq_factor=float(params["high_freq_factor"]),
                           original_max_position=int(params["original_max_position_embeddings"]))
    if kind == "linear":
        return RopeScaling("linear", factor=float(params["factor"]))
    raise ValueError(f"Unsupported rope scaling type {kind!r} (supported: llama3, linear)")


def from_hf_config(hf: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a Hugging Face `config.json` dict."""
    if hf.get("model_type") == "gemma3" and "text_config" in hf:
        hf = {"model_type": "gemma3_text", **hf["text_config"]}
    model_type = hf.get("model_type")
    if model_type not in _HF_MODEL_TYPES:
        raise ValueError(f"Unsupported model_type {model_type!r} in config.json; "
                         f"supported: {', '.join(sorted(_HF_MODEL_TYPES))}")
    family = _HF_MODEL_TYPES[model_type]
    num_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
    eos = hf.get("eos_token_id")
    common = dict(
        family=family, vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], d_ff=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads, head_dim=head_dim,
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=hf.get("max_position_embeddings", 8192),
        bos_id=hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 1,
        eos_id=(eos[0] if isinstance(eos, list) else eos) if eos is not None else 2,
        pad_id=hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0,
    )
    if family == "gemma3":
        full = _rope_params(hf, "full_attention")
        local = _rope_params(hf, "sliding_attention")
        hf_types = hf.get("layer_types")
        layer_types = (tuple("local" if t == "sliding_attention" else "global" for t in hf_types) if hf_types
                       else _gemma_layer_types(hf["num_hidden_layers"], hf.get("sliding_window_pattern", 6)))
        return ModelConfig(
            **common, rope_theta=float(full.get("rope_theta", hf.get("rope_theta", 1_000_000.0))),
            rope_scaling=_rope_scaling(full),
            local_rope_theta=float(local.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0))),
            sliding_window=hf.get("sliding_window"), layer_types=layer_types, qk_norm=True, norm_offset=1.0,
            post_norms=True, activation="gelu_tanh", scale_embeddings=True,
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar", head_dim))
    params = _rope_params(hf)
    return ModelConfig(
        **common, rope_theta=float(params.get("rope_theta", hf.get("rope_theta", 10_000.0))),
        rope_scaling=_rope_scaling(params), qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
        qk_norm=family == "qwen3")


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The Hugging Face `config.json` dict that `from_hf_config` maps back to `cfg`."""
    model_type = {v: k for k, v in _HF_MODEL_TYPES.items()}[cfg.family]
    hf: dict[str, Any] = dict(
        model_type=model_type, vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=cfg.max_seq_len,
        bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id, pad_token_id=cfg.pad_id,
        architectures=[{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                        "gemma3": "Gemma3ForCausalLM"}[cfg.family]],
    )

    def rope(theta: float, scaling: RopeScaling | None) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
        if scaling is not None and scaling.kind == "llama3":
            out.update(rope_type="llama3", factor=scaling.factor, low_freq_factor=scaling.low_freq_factor,
                       high_freq_factor=scaling.high_freq_factor,
                       original_max_position_embeddings=scaling.original_max_position)
        elif scaling is not None:
            out.update(rope_type="linear", factor=scaling.factor)
        return out

    if cfg.family == "gemma3":
        hf.update(
            hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=cfg.query_pre_attn_scalar,
            sliding_window=cfg.sliding_window,
            layer_types=["sliding_attention" if t == "local" else "full_attention" for t in cfg.layer_types],
            rope_parameters={"full_attention": rope(cfg.rope_theta, cfg.rope_scaling),
                             "sliding_attention": rope(cfg.local_rope_theta, None)})
    else:
        hf.update(hidden_act="silu", attention_bias=cfg.qkv_bias, rope_parameters=rope(cfg.rope_theta, cfg.rope_scaling))
    return hf
