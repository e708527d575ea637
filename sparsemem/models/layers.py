"""Stateless building blocks of the decoder: RMSNorm, RoPE, masks, attention and its kernels."""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from sparsemem.models.config import ModelConfig, RopeScaling


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, offset: float) -> jax.Array:
    """RMSNorm over the last axis in float32; the scale is `weight + offset`."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * (weight.astype(jnp.float32) + offset)).astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse RoPE frequencies `[head_dim // 2]` (float32), with optional Llama-3.1/linear scaling."""
    inv_freq = (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))).astype(np.float32)
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return (inv_freq / scaling.factor).astype(np.float32)
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables `[B, T, head_dim]` for integer positions `[B, T]`."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x [B, T, heads, head_dim]` by position (half-split convention, as in HF)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Position of every token within its segment (run of equal ids), starting at 0."""
    idx = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :]
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - start_idx


def attention_masks(q_index: jax.Array, q_segments: jax.Array, k_segments: jax.Array,
                    sliding_window: int | None) -> tuple[jax.Array, jax.Array | None]:
    """Boolean masks `[B, T, S]` (global, local) for queries at slot indices `q_index [T]`.

    A query sees keys of its own non-zero segment at slot index <= its own; local
    layers additionally require `q_index - k_index < sliding_window` (as in HF Gemma-3).
    """
    k_index = jnp.arange(k_segments.shape[1], dtype=jnp.int32)
    causal = k_index[None, :] <= q_index[:, None]
    same = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] != 0)
    full = same & causal[None]
    if not sliding_window:
        return full, None
    window = (q_index[:, None] - k_index[None, :]) < sliding_window
    return full, full & window[None]


def memory_in_window(positions: jax.Array, memory_slots: int, sliding_window: int) -> jax.Array:
    """Which memory slots `[B, T, M]` a sliding-window query at `positions [B, T]` sees.

    Memory slot `j` stands for the prefix token at position `j` (text follows the memory
    at position `M`), so it leaves a local layer's window exactly as that token would:
    `position - j < sliding_window`. Global layers see every slot.
    """
    slots = jnp.arange(memory_slots, dtype=positions.dtype)
    return (positions[:, :, None] - slots[None, None, :]) < sliding_window


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Grouped-query attention. q `[B,T,H,Dh]`, k/v `[B,S,Hkv,Dh]`, mask `[B,T,S]` -> `[B,T,H,Dh]`.

    Softmax runs in float32. A query with no visible key (padding) gets a uniform
    average instead of NaN; its output is never used.
    """
    b, t, h, dh = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, h // hkv, dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, dh)


def fused_attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                 implementation: Literal["cudnn", "xla"]) -> jax.Array:
    """`attend` through `jax.nn.dot_product_attention`, with the same boolean mask (as `[B, 1, T, S]`).

    `"cudnn"` is cuDNN's fused kernel (GPU, bfloat16/float16 only), which keeps no `[T, S]`
    scores; `"xla"` is jax's reference for the same call: it runs on any backend, which is
    how CPU tests check the call the GPU makes. Grouped-query heads are native. Both turn
    the mask into a large finite negative bias, so a query with no visible key (padding)
    gets a uniform average, as in `attend`.
    """
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale, implementation=implementation)


def fused_causal_attend(q: jax.Array, k: jax.Array, v: jax.Array, scale: float,
                        implementation: Literal["cudnn", "xla"]) -> jax.Array:
    """`fused_attend` where the mask is every one of the `M = S - T` key slots before the queries, then causal.

    That is a causal mask aligned to the last query; the kernel's own causal mask is aligned to
    the first, so the queries are padded in front to `S` and the padded rows dropped. cuDNN then
    skips the masked blocks instead of reading a mask.
    """
    memory = k.shape[1] - q.shape[1]
    padded = jnp.pad(q, ((0, 0), (memory, 0), (0, 0), (0, 0)))
    out = jax.nn.dot_product_attention(padded, k, v, scale=scale, is_causal=True, implementation=implementation)
    return out[:, memory:]


def default_platform() -> str:
    """The platform a jitted forward compiles for, as lowering names it: cpu, cuda, rocm or tpu."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    return "rocm" if "rocm" in jax.extend.backend.get_backend().platform_version.lower() else "cuda"


def attention_kernel(requested: str, dtype, platform: str, cached: bool) -> str:
    """The kernel `ModelConfig.attention_impl == requested` runs at compute `dtype` on `platform`.

    "auto" is cuDNN's fused kernel on CUDA at bfloat16/float16 (the dtypes it takes) for a
    forward without a KV cache, and the float32-scores `attend` ("xla") everywhere else: cuDNN
    on cached prefill and one-token decode steps is not yet measured. "xla" and "cudnn" are
    taken as asked.
    """
    if requested != "auto":
        return requested
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if platform == "cuda" and half and not cached else "xla"


def attend_with(implementation: str, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, *,
                cached: bool, causal: bool = False) -> jax.Array:
    """`attend` (same arguments and result) by the kernel `attention_kernel` picks for `implementation`.

    `cached`: the keys are a KV cache's. `causal`: `mask` is known to be the memory slots then
    causal text (`fused_causal_attend`).
    """
    if attention_kernel(implementation, q.dtype, default_platform(), cached) != "cudnn":
        return attend(q, k, v, mask, scale)
    if causal:
        return fused_causal_attend(q, k, v, scale, "cudnn")
    return fused_attend(q, k, v, mask, scale, "cudnn")


def advance_positions(next_position: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Each row's next RoPE position `[B]` after writing tokens at `positions` (padding, segment 0, ignored)."""
    last = jnp.max(jnp.where(segment_ids != 0, positions, -1), axis=1)
    return jnp.maximum(next_position, last + 1)


def activation(x: jax.Array, kind: str) -> jax.Array:
    """The MLP gate activation `kind` of `ModelConfig.activation` (tanh-approximated GELU or SiLU)."""
    return jax.nn.gelu(x, approximate=True) if kind == "gelu_tanh" else jax.nn.silu(x)


def vocab_logits(hidden: jax.Array, unembed: jax.Array) -> jax.Array:
    """Full-vocabulary logits (float32) of `hidden [..., d]` through `unembed [V, d]`."""
    return jnp.einsum("...d,vd->...v", hidden, unembed.astype(hidden.dtype), preferred_element_type=jnp.float32)
