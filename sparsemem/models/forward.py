"""One forward path for `Decoder` and `CompactDecoder`: the prologue and the transformer block.

`prologue` runs once per forward: it embeds the tokens and computes what every block
reads (`Inputs`: positions, attention masks, RoPE tables, the cache slot to write).
`block` is one pre-norm block (its halves `attention` and `mlp`) with a layer's hooks
applied (`LayerHooks`). The stacked `Decoder` scans it over layers; the compacted decoder loops
over blocks of different widths, so `block` reads every width from the weights it is
given and skips a sub-block left with no units (the masked model adds exactly zero
there).
"""

from __future__ import annotations

import functools
from typing import Mapping, Protocol

import jax
import jax.numpy as jnp
from flax import struct

from sparsemem.models import layers
from sparsemem.models.config import ModelConfig
from sparsemem.models.hooks import LayerHooks, LoRADelta
from sparsemem.parallel.rules import constrain


class Cache(Protocol):
    """Slot bookkeeping shared by `KVCache` and the serving cache."""

    segment_ids: jax.Array  # [B, S] segment of every token slot, 0 when empty
    next_position: jax.Array  # [B] RoPE position of each row's next token
    index: jax.Array  # token slots written so far

    @property
    def write_index(self) -> jax.Array:
        """Key slot of the next token in the per-layer key/value arrays."""


@struct.dataclass
class Inputs:
    """What every block of one forward reads; computed once by `prologue`.

    `positions`, `segment_ids [B, T]` are the new tokens' (defaults filled in),
    `key_segments [B, S]` every token slot's after this write. Masks are `[B, T, M + S]`:
    M memory slots, then S token slots (`local_mask` is None without
    sliding-window layers). RoPE tables are `(cos, sin)` `[B, T, Dh]`. `write_index` is
    the cache slot of the first new token (None: no cache). `global_causal`: the global mask is
    every memory slot and the text up to each query (one unpadded document, no cache), so a
    fused kernel may build it from causality alone instead of reading it.
    """

    positions: jax.Array
    segment_ids: jax.Array
    key_segments: jax.Array
    global_mask: jax.Array
    local_mask: jax.Array | None
    rope_global: tuple[jax.Array, jax.Array]
    rope_local: tuple[jax.Array, jax.Array] | None
    write_index: jax.Array | None
    global_causal: bool = struct.field(pytree_node=False, default=False)

    def attention(self, is_local: bool | jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`(mask, cos, sin)` of a layer; `is_local` is a Python bool or, inside a scan, a traced one."""
        if self.local_mask is None:
            return (self.global_mask, *self.rope_global)
        if isinstance(is_local, bool):
            return (self.local_mask, *self.rope_local) if is_local else (self.global_mask, *self.rope_global)
        return tuple(jnp.where(is_local, local, full) for local, full in
                     zip((self.local_mask, *self.rope_local), (self.global_mask, *self.rope_global)))

    def advance(self, cache: Cache) -> dict[str, jax.Array]:
        """`cache`'s slot bookkeeping after this forward's tokens are written (for `cache.replace`)."""
        return dict(segment_ids=self.key_segments, index=cache.index + self.positions.shape[1],
                    next_position=layers.advance_positions(cache.next_position, self.positions, self.segment_ids))


def prologue(cfg: ModelConfig, embed: jax.Array, tokens: jax.Array, *, dtype, positions: jax.Array | None,
             segment_ids: jax.Array | None, cache: Cache | None, memory_slots: int = 0,
             first_position: int = 0) -> tuple[jax.Array, Inputs]:
    """The embedded tokens `[B, T, d]` and the `Inputs` of a forward.

    Default positions restart per segment and continue the cache's (without a cache they
    start at `first_position`). `memory_slots` key slots precede the token slots in every
    layer's keys, as a prefix at positions `0..M-1`: global layers always see them, local
    layers while they are inside the window (`layers.memory_in_window`).
    """
    b, t = tokens.shape
    global_causal = segment_ids is None and cache is None
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    if positions is None:
        positions = layers.segment_positions(segment_ids)
        positions = positions + (cache.next_position[:, None] if cache is not None else first_position)

    x = embed[tokens].astype(dtype)
    if cfg.scale_embeddings:
        x = x * jnp.asarray(cfg.d_model ** 0.5, dtype)
    x = constrain(x, ("batch", "act_seq", "act_embed"))

    if cache is None:
        q_index = jnp.arange(t, dtype=jnp.int32)
        key_segments = segment_ids
    else:
        q_index = cache.index + jnp.arange(t, dtype=jnp.int32)
        key_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32),
                                                    (0, cache.index))
    window = cfg.sliding_window if "local" in cfg.layer_types else None
    global_mask, local_mask = layers.attention_masks(q_index, segment_ids, key_segments, window)
    if memory_slots:
        global_mask = jnp.concatenate([jnp.ones((b, t, memory_slots), bool), global_mask], axis=2)
        if local_mask is not None:
            local_mask = jnp.concatenate([layers.memory_in_window(positions, memory_slots, window), local_mask],
                                         axis=2)
    rope_global = layers.rope_tables(positions, layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    rope_local = (layers.rope_tables(positions, layers.rope_inv_freq(cfg.head_dim, cfg.local_rope_theta, None))
                  if local_mask is not None else None)
    return x, Inputs(positions=positions, segment_ids=segment_ids, key_segments=key_segments,
                     global_mask=global_mask, local_mask=local_mask, rope_global=rope_global, rope_local=rope_local,
                     write_index=cache.write_index if cache is not None else None, global_causal=global_causal)


def project(x: jax.Array, weight: jax.Array, lora: LoRADelta | None, in_axes: int = 1) -> jax.Array:
    """`x [B, T, *in] @ weight [*in, *out]` plus the LoRA delta (on the flat features), `[B, T, *out]`.

    `lora.a [B, in, r]`, `lora.b [B, r, out]`: one low-rank delta per example.
    """
    y = jnp.tensordot(x, weight, axes=in_axes)
    if lora is None:
        return y
    flat = x.reshape(x.shape[:2] + (-1,))
    low = jnp.einsum("bti,bir->btr", flat, lora.a.astype(x.dtype))
    delta = jnp.einsum("btr,bro->bto", low, lora.b.astype(x.dtype)) * lora.scale
    return y + delta.reshape(y.shape)


def block(cfg: ModelConfig, weights: Mapping[str, jax.Array], x: jax.Array, inputs: Inputs, *,
          is_local: bool | jax.Array, hooks: LayerHooks, cache_kv: tuple[jax.Array, jax.Array] | None = None,
          kv_of_head: tuple[int, ...] | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """One pre-norm transformer block on `x [B, T, d]`; returns it and the layer's updated cache.

    `cache_kv`: this layer's keys/values `[B, S, Hkv, Dh]`, the new ones written at
    `inputs.write_index`. `hooks.memory_k/v` are put in front of the keys. `kv_of_head`:
    for ragged query groups, the KV head each query head reads (None: equal, ordered groups).
    Computes in `x.dtype`.
    """
    if weights["wq"].shape[1]:  # query heads left
        x, cache_kv = attention(cfg, weights, x, inputs, is_local=is_local, hooks=hooks, cache_kv=cache_kv,
                                kv_of_head=kv_of_head)
    if weights["w_gate"].shape[1]:  # MLP neurons left
        x, _ = mlp(cfg, weights, x, hooks=hooks)
    return x, cache_kv


def attention(cfg: ModelConfig, weights: Mapping[str, jax.Array], x: jax.Array, inputs: Inputs, *,
              is_local: bool | jax.Array, hooks: LayerHooks, cache_kv: tuple[jax.Array, jax.Array] | None = None,
              kv_of_head: tuple[int, ...] | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """The attention half of `block` (same arguments): `x` plus attention, and the updated cache."""
    w, norm, lora = _in_dtype(weights, x.dtype), _norm(cfg), hooks.lora.get
    mask, cos, sin = inputs.attention(is_local)
    h = norm(x, w["attn_norm"])
    q, k, v = (project(h, w[f"w{name}"], lora(name)) for name in ("q", "k", "v"))
    if cfg.qkv_bias:
        q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
    if cfg.qk_norm:
        q, k = norm(q, w["q_norm"]), norm(k, w["k_norm"])
    q = constrain(layers.apply_rope(q, cos, sin), ("batch", "act_seq", "act_heads", None))
    k = layers.apply_rope(k, cos, sin)
    if cache_kv is not None:
        cache_kv = tuple(jax.lax.dynamic_update_slice(old, new.astype(old.dtype), (0, inputs.write_index, 0, 0))
                         for old, new in zip(cache_kv, (k, v)))
        k, v = cache_kv
    if hooks.memory_k is not None:
        k = jnp.concatenate([hooks.memory_k.astype(x.dtype), k], axis=1)
        v = jnp.concatenate([hooks.memory_v.astype(x.dtype), v], axis=1)
    if kv_of_head is not None:  # ragged groups: one K/V per query head
        index = jnp.asarray(kv_of_head, jnp.int32)
        k, v = jnp.take(k, index, axis=2), jnp.take(v, index, axis=2)
    causal = inputs.global_causal and (inputs.local_mask is None or is_local is False)
    ctx = layers.attend_with(cfg.attention_impl, q, k, v, mask, cfg.attn_scale, cached=cache_kv is not None,
                             causal=causal)
    if hooks.head_scale is not None:
        ctx = ctx * _unit_scale(hooks.head_scale, x.dtype)[..., None]
    attn = project(ctx, w["wo"], lora("o"), in_axes=2)
    if cfg.post_norms:
        attn = norm(attn, w["attn_post_norm"])
    return constrain(x + attn, ("batch", "act_seq", "act_embed")), cache_kv


def mlp(cfg: ModelConfig, weights: Mapping[str, jax.Array], x: jax.Array, *,
        hooks: LayerHooks) -> tuple[jax.Array, jax.Array]:
    """The MLP half of `block`: `x` plus the gated MLP, and the gate pre-activation `[B, T, F]`.

    The gate pre-activation is what neuron statistics read (`Decoder.gate_activity`); `block`
    drops it, so its compiled program is the same as with the MLP written inline.
    """
    w, norm, lora = _in_dtype(weights, x.dtype), _norm(cfg), hooks.lora.get
    h = norm(x, w["mlp_norm"])
    gate = project(h, w["w_gate"], lora("gate"))
    inner = constrain(layers.activation(gate, cfg.activation) * project(h, w["w_up"], lora("up")),
                      ("batch", "act_seq", "act_mlp"))
    if hooks.neuron_scale is not None:
        inner = inner * _unit_scale(hooks.neuron_scale, x.dtype)
    out = project(inner, w["w_down"], lora("down"))
    if cfg.post_norms:
        out = norm(out, w["mlp_post_norm"])
    return constrain(x + out, ("batch", "act_seq", "act_embed")), gate


def _unit_scale(scale: jax.Array, dtype) -> jax.Array:
    """A head or neuron scale `[U]`, or per example `[B, U]`, broadcastable against `[B, T, U]` activations."""
    scale = scale.astype(dtype)
    return scale[:, None, :] if scale.ndim == 2 else scale


def _in_dtype(weights: Mapping[str, jax.Array], dtype) -> dict[str, jax.Array]:
    return {name: value.astype(dtype) for name, value in weights.items()}


def _norm(cfg: ModelConfig):
    return functools.partial(layers.rms_norm, eps=cfg.norm_eps, offset=cfg.norm_offset)
