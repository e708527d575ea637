"""One Flax NNX decoder for Llama-3.x, Qwen2.5, Qwen3 and Gemma-3, chosen by `ModelConfig`.

Layer weights are stacked along a leading `layers` axis and the forward scans over
them (`lax.scan`), so compile time does not grow with depth and per-layer hook
arrays (`Hooks`) slice naturally. Every parameter carries `logical_axes` metadata
for `sparsemem.parallel`; the main activations are constrained by logical name.

The same `__call__` serves training (packed sequences: `segment_ids` keep
documents apart, `positions` restart per document) and cached generation (pass a
`KVCache`: the new tokens are written at `cache.index` and attend to every filled slot).
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx, struct

from sparsemem.models import layers
from sparsemem.models.config import ModelConfig
from sparsemem.models.hooks import Hooks
from sparsemem.parallel.rules import constrain

Remat = Literal["none", "full", "dots"]


@struct.dataclass
class KVCache:
    """Keys (post-RoPE, post-norm) and values of every layer, plus slot bookkeeping.

    k, v: `[L, B, S, Hkv, Dh]`; `segment_ids [B, S]` is 0 for empty/padding slots;
    `next_position [B]` is the RoPE position the next token of each row gets;
    `index` is the number of slots written so far (shared by all rows: left padding).
    """

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    next_position: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def _param(rngs: nnx.Rngs, shape, axes, dtype, init: Literal["normal", "zeros", "ones"] = "normal"):
    if init == "normal":
        value = 0.02 * jax.random.normal(rngs.params(), shape, dtype)
    else:
        value = (jnp.zeros if init == "zeros" else jnp.ones)(shape, dtype)
    return nnx.Param(value, logical_axes=axes)


class DecoderLayers(nnx.Module):
    """All transformer blocks, weights stacked on a leading layer axis."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        L, d, f, h, hkv, dh = cfg.num_layers, cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        norm_init = "zeros" if cfg.norm_offset else "ones"
        p = functools.partial(_param, rngs, dtype=param_dtype)
        self.attn_norm = p((L, d), ("layers", "norm"), init=norm_init)
        self.mlp_norm = p((L, d), ("layers", "norm"), init=norm_init)
        if cfg.post_norms:
            self.attn_post_norm = p((L, d), ("layers", "norm"), init=norm_init)
            self.mlp_post_norm = p((L, d), ("layers", "norm"), init=norm_init)
        self.wq = p((L, d, h, dh), ("layers", "embed", "heads", "head_dim"))
        self.wk = p((L, d, hkv, dh), ("layers", "embed", "kv_heads", "head_dim"))
        self.wv = p((L, d, hkv, dh), ("layers", "embed", "kv_heads", "head_dim"))
        self.wo = p((L, h, dh, d), ("layers", "heads", "head_dim", "embed"))
        if cfg.qkv_bias:
            self.bq = p((L, h, dh), ("layers", "heads", "head_dim"), init="zeros")
            self.bk = p((L, hkv, dh), ("layers", "kv_heads", "head_dim"), init="zeros")
            self.bv = p((L, hkv, dh), ("layers", "kv_heads", "head_dim"), init="zeros")
        if cfg.qk_norm:
            self.q_norm = p((L, dh), ("layers", "norm"), init=norm_init)
            self.k_norm = p((L, dh), ("layers", "norm"), init=norm_init)
        self.w_gate = p((L, d, f), ("layers", "embed", "mlp"))
        self.w_up = p((L, d, f), ("layers", "embed", "mlp"))
        self.w_down = p((L, f, d), ("layers", "mlp", "embed"))

    def weights(self) -> dict[str, jax.Array]:
        """The stacked weight arrays by name (what the layer scan consumes)."""
        return {name: var[...] for name, var in vars(self).items() if isinstance(var, nnx.Param)}


class Decoder(nnx.Module):
    """Decoder-only transformer; see the module docstring."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32,
                 remat: Remat = "none"):
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), param_dtype)
        self.layers = DecoderLayers(cfg, rngs=rngs, param_dtype=param_dtype)
        self.final_norm = _param(rngs, (cfg.d_model,), ("norm",), param_dtype,
                                 init="zeros" if cfg.norm_offset else "ones")
        if not cfg.tie_embeddings:
            self.unembed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), param_dtype)

    # -- generation cache -------------------------------------------------
    def init_cache(self, batch: int, max_len: int) -> KVCache:
        cfg = self.cfg
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return KVCache(k=jnp.zeros(shape, self.dtype), v=jnp.zeros(shape, self.dtype),
                       segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                       next_position=jnp.zeros((batch,), jnp.int32), index=jnp.zeros((), jnp.int32))

    # -- forward ----------------------------------------------------------
    def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, hooks: Hooks | None = None,
                 cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """Final hidden states `[B, T, d]` (after the final norm) and the updated cache."""
        cfg = self.cfg
        b, t = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if positions is None:
            positions = layers.segment_positions(segment_ids)
            if cache is not None:
                positions = positions + cache.next_position[:, None]

        x = self.embed[...][tokens].astype(self.dtype)
        if cfg.scale_embeddings:
            x = x * jnp.asarray(cfg.d_model ** 0.5, self.dtype)
        x = constrain(x, ("batch", "act_seq", "act_embed"))

        if cache is None:
            q_index = jnp.arange(t, dtype=jnp.int32)
            k_segments = segment_ids
        else:
            q_index = cache.index + jnp.arange(t, dtype=jnp.int32)
            k_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32),
                                                      (0, cache.index))
        global_mask, local_mask = layers.attention_masks(q_index, segment_ids, k_segments,
                                                         cfg.sliding_window if "local" in cfg.layer_types else None)
        rope_global = layers.rope_tables(positions, layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta,
                                                                         cfg.rope_scaling))
        rope_local = (layers.rope_tables(positions, layers.rope_inv_freq(cfg.head_dim, cfg.local_rope_theta, None))
                      if local_mask is not None else None)

        lora_scales = {name: delta.scale for name, delta in hooks.lora.items()} if hooks is not None else {}

        def block(x, xs):
            weights, is_local, hook, kv = xs
            weights = jax.tree.map(lambda w: w.astype(self.dtype), weights)  # one layer at a time
            if local_mask is None:
                mask, (cos, sin) = global_mask, rope_global
            else:
                mask = jnp.where(is_local, local_mask, global_mask)
                cos, sin = (jnp.where(is_local, a, g) for a, g in zip(rope_local, rope_global))
            return _block(cfg, weights, x, hook, lora_scales, kv, mask, cos, sin,
                          cache.index if cache is not None else None, self.dtype)

        if self.remat != "none":
            policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if self.remat == "dots" else None
            block = jax.checkpoint(block, policy=policy, prevent_cse=False)

        xs = (self.layers.weights(), jnp.asarray(cfg.is_local), hooks.per_layer() if hooks is not None else {},
              (cache.k, cache.v) if cache is not None else None)
        x, new_kv = jax.lax.scan(block, x, xs)

        x = layers.rms_norm(x, self.final_norm[...], cfg.norm_eps, cfg.norm_offset)
        if cache is not None:
            cache = KVCache(k=new_kv[0], v=new_kv[1], segment_ids=k_segments,
                            next_position=layers.advance_positions(cache.next_position, positions, segment_ids),
                            index=cache.index + t)
        return x, cache

    def unembedding(self) -> jax.Array:
        """The `[V, d]` output projection (the embedding when tied)."""
        return (self.embed if self.cfg.tie_embeddings else self.unembed)[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Full-vocabulary logits (float32). For losses use `sparsemem.models.loss` (chunked)."""
        return layers.vocab_logits(hidden, self.unembedding())


def _lora(x: jax.Array, hook: dict, scales: dict, name: str) -> jax.Array | None:
    """Per-example low-rank delta `[B, T, out]` for projection `name`, or None."""
    pair = hook.get(f"lora_{name}")
    if pair is None:
        return None
    a, b = pair
    low = jnp.einsum("bti,bir->btr", x, a.astype(x.dtype))
    return jnp.einsum("btr,bro->bto", low, b.astype(x.dtype)) * scales[name]


def _block(cfg: ModelConfig, w: dict, x: jax.Array, hook: dict, lora_scales: dict, kv, mask, cos, sin,
           cache_index, dtype):
    """One pre-norm transformer block (attention + gated MLP) with hooks applied."""
    norm = functools.partial(layers.rms_norm, eps=cfg.norm_eps, offset=cfg.norm_offset)

    def project(x, weight, name):
        """`x [B,T,d] @ weight [d, *out]` plus the projection's LoRA delta, shaped `[B, T, *out]`."""
        y = jnp.einsum("btd,d...->bt...", x, weight)
        delta = _lora(x, hook, lora_scales, name)
        return y if delta is None else y + delta.reshape(y.shape)

    # attention
    h = norm(x, w["attn_norm"])
    q = project(h, w["wq"], "q")
    k = project(h, w["wk"], "k")
    v = project(h, w["wv"], "v")
    if cfg.qkv_bias:
        q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
    if cfg.qk_norm:
        q, k = norm(q, w["q_norm"]), norm(k, w["k_norm"])
    q = constrain(layers.apply_rope(q, cos, sin), ("batch", "act_seq", "act_heads", None))
    k = layers.apply_rope(k, cos, sin)
    if kv is not None:
        k_all = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, cache_index, 0, 0))
        v_all = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, cache_index, 0, 0))
        kv = (k_all, v_all)
    else:
        k_all, v_all = k, v
    if "memory_k" in hook:
        mem_k, mem_v = hook["memory_k"].astype(dtype), hook["memory_v"].astype(dtype)
        k_all = jnp.concatenate([mem_k, k_all], axis=1)
        v_all = jnp.concatenate([mem_v, v_all], axis=1)
        mask = jnp.concatenate([jnp.ones(mask.shape[:2] + (mem_k.shape[1],), bool), mask], axis=2)
    ctx = layers.attend(q, k_all, v_all, mask, cfg.attn_scale)
    if "head_scale" in hook:
        ctx = ctx * hook["head_scale"].astype(dtype)[:, None]
    b, t = ctx.shape[:2]
    ctx_flat = ctx.reshape(b, t, -1)
    attn = jnp.einsum("bthk,hkd->btd", ctx, w["wo"])
    delta = _lora(ctx_flat, hook, lora_scales, "o")
    if delta is not None:
        attn = attn + delta
    if cfg.post_norms:
        attn = norm(attn, w["attn_post_norm"])
    x = constrain(x + attn, ("batch", "act_seq", "act_embed"))

    # gated MLP
    h = norm(x, w["mlp_norm"])
    gate = project(h, w["w_gate"], "gate")
    up = project(h, w["w_up"], "up")
    act = jax.nn.gelu(gate, approximate=True) if cfg.activation == "gelu_tanh" else jax.nn.silu(gate)
    inner = constrain(act * up, ("batch", "act_seq", "act_mlp"))
    if "neuron_scale" in hook:
        inner = inner * hook["neuron_scale"].astype(dtype)
    mlp = project(inner, w["w_down"], "down")
    if cfg.post_norms:
        mlp = norm(mlp, w["mlp_post_norm"])
    return constrain(x + mlp, ("batch", "act_seq", "act_embed")), kv
