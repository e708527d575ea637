"""The compacted decoder: per-layer weights of different widths, memory slots at the front of the cache.

Layout choice: pruning leaves every layer with its own number of query heads, KV
heads and MLP neurons, so the stacked-layer scan of `Decoder` does not fit. Padding
each layer to the widest one would give back much of the saving (one wide layer
pads all others), so the compacted model is an unrolled loop over `CompactBlock`s
with exactly the kept units; compile time grows with depth, which serving pays once.

Grouped-query attention stays grouped: query heads are kept in order, `kv_of_head`
says which kept KV head each one reads. Where every kept KV head still serves the
same number of query heads (always true for one KV head per layer, as in
Gemma-3-270M) the grouped kernel is used as is; ragged groups gather K/V per query
head. A layer with no heads (or no neurons) skips that sub-block: the masked model
adds exactly zero there.

Memory: a row's domain memory (`RowMemory`) puts its KV slots at the *front* of the
decode cache once (`init_cache`), visible to every query of that row in every layer
(sliding-window layers too), with no RoPE applied, exactly as `Hooks.memory_k/v` in
`Decoder`; the per-row LoRA deltas are applied at every step. Text follows the
memory, as in training runs: with M memory slots its positions start at M
(prefill-initialised keys carry positions 0..M-1, so the memory acts as a prefix).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from sparsemem.models import layers
from sparsemem.models.config import ModelConfig


@struct.dataclass
class RowMemory:
    """Per-row domain memory for one batch, in the compacted widths of each layer.

    `k`, `v`: per layer `[B, M, K'_l, Dh]` (empty tuples when the modules carry no KV
    memory); `lora`: per layer `{proj: (a [B, in', r], b [B, r, out'])}`.
    """

    k: tuple
    v: tuple
    lora: tuple
    lora_scale: float = struct.field(pytree_node=False, default=1.0)

    @property
    def slots(self) -> int:
        return self.k[0].shape[1] if self.k else 0


@struct.dataclass
class ServeCache:
    """Per-layer keys/values `[B, M + S, K'_l, Dh]`: M memory slots, then S token slots.

    `segment_ids [B, S]`, `next_position [B]` and `index` (token slots written) as in `KVCache`.
    """

    k: tuple
    v: tuple
    segment_ids: jax.Array
    next_position: jax.Array
    index: jax.Array
    memory_slots: int = struct.field(pytree_node=False, default=0)


class CompactBlock(nnx.Module):
    """One transformer block with only its kept units (weights without a layer axis)."""

    def __init__(self, weights: dict[str, np.ndarray], kv_of_head: tuple[int, ...], is_local: bool):
        self.kv_of_head = tuple(int(i) for i in kv_of_head)
        self.is_local = bool(is_local)
        counts = np.bincount(self.kv_of_head) if self.kv_of_head else np.zeros(0, int)
        self.grouped = bool(len(counts) and np.all(counts == counts[0])
                            and list(self.kv_of_head) == sorted(self.kv_of_head))
        for name, w in weights.items():
            setattr(self, name, nnx.Param(jnp.asarray(w)))

    @property
    def num_heads(self) -> int:
        return len(self.kv_of_head)

    @property
    def num_kv_heads(self) -> int:
        return self.wk.shape[1]

    @property
    def num_neurons(self) -> int:
        return self.w_gate.shape[1]


class CompactDecoder(nnx.Module):
    """Decoder with per-layer widths; same inputs and outputs as `Decoder`, plus row memory."""

    def __init__(self, cfg: ModelConfig, embed: np.ndarray, final_norm: np.ndarray, unembed: np.ndarray | None,
                 blocks: list[CompactBlock], dtype=jnp.float32):
        if len(blocks) != cfg.num_layers:
            raise ValueError(f"{len(blocks)} blocks for a {cfg.num_layers}-layer config")
        self.cfg = cfg
        self.dtype = dtype
        self.embed = nnx.Param(jnp.asarray(embed))
        self.final_norm = nnx.Param(jnp.asarray(final_norm))
        if unembed is not None:
            self.unembed = nnx.Param(jnp.asarray(unembed))
        self.blocks = nnx.List(blocks)

    def init_cache(self, batch: int, max_len: int, memory: RowMemory | None = None) -> ServeCache:
        """An empty cache for `max_len` tokens, starting with `memory`'s KV slots (if any)."""
        m = memory.slots if memory is not None else 0
        ks, vs = [], []
        for i, blk in enumerate(self.blocks):
            shape = (batch, max_len, blk.num_kv_heads, self.cfg.head_dim)
            empty = jnp.zeros(shape, self.dtype)
            if m:
                ks.append(jnp.concatenate([memory.k[i].astype(self.dtype), empty], axis=1))
                vs.append(jnp.concatenate([memory.v[i].astype(self.dtype), empty], axis=1))
            else:
                ks.append(empty)
                vs.append(jnp.zeros(shape, self.dtype))
        return ServeCache(k=tuple(ks), v=tuple(vs), segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                          next_position=jnp.full((batch,), m, jnp.int32), index=jnp.zeros((), jnp.int32),
                          memory_slots=m)

    def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, memory: RowMemory | None = None,
                 cache: ServeCache | None = None) -> tuple[jax.Array, ServeCache | None]:
        """Final hidden states `[B, T, d]` and the updated cache.

        Without a cache, `memory`'s KV slots are prepended to every layer's keys (and
        default positions start after them); with a cache they must already be in it
        (`init_cache(..., memory)`), and only `memory`'s LoRA is used here.
        """
        cfg = self.cfg
        b, t = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if positions is None:
            positions = layers.segment_positions(segment_ids)
            if cache is not None:
                positions = positions + cache.next_position[:, None]
            elif memory is not None:
                positions = positions + memory.slots
        if cache is not None and memory is not None and memory.slots not in (0, cache.memory_slots):
            raise ValueError(f"memory has {memory.slots} KV slots but the cache was made with "
                             f"{cache.memory_slots}; pass the same memory to init_cache")

        x = self.embed[...].astype(self.dtype)[tokens]
        if cfg.scale_embeddings:
            x = x * jnp.asarray(cfg.d_model ** 0.5, self.dtype)
        if cache is None:
            q_index = jnp.arange(t, dtype=jnp.int32)
            k_segments = segment_ids
            mem_len = memory.slots if memory is not None else 0
        else:
            q_index = cache.index + jnp.arange(t, dtype=jnp.int32)
            k_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32),
                                                      (0, cache.index))
            mem_len = cache.memory_slots
        window = cfg.sliding_window if "local" in cfg.layer_types else None
        masks = layers.attention_masks(q_index, segment_ids, k_segments, window)
        if mem_len:
            seen = jnp.ones((b, t, mem_len), bool)
            masks = tuple(None if m is None else jnp.concatenate([seen, m], axis=2) for m in masks)
        global_mask, local_mask = masks
        rope_global = layers.rope_tables(positions, layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta,
                                                                         cfg.rope_scaling))
        rope_local = (layers.rope_tables(positions, layers.rope_inv_freq(cfg.head_dim, cfg.local_rope_theta, None))
                      if local_mask is not None else None)

        new_k, new_v = [], []
        for i, blk in enumerate(self.blocks):
            local = blk.is_local and local_mask is not None
            mask, (cos, sin) = (local_mask, rope_local) if local else (global_mask, rope_global)
            lora = memory.lora[i] if memory is not None and memory.lora else {}
            if cache is not None:
                kv = (cache.k[i], cache.v[i], mem_len + cache.index)
            elif mem_len:
                kv = (memory.k[i].astype(self.dtype), memory.v[i].astype(self.dtype), None)
            else:
                kv = None
            x, kv = _block(cfg, blk, x, lora, memory.lora_scale if memory is not None else 1.0, kv, mask,
                           cos, sin, self.dtype)
            if cache is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])

        x = layers.rms_norm(x, self.final_norm[...], cfg.norm_eps, cfg.norm_offset)
        if cache is not None:
            cache = ServeCache(k=tuple(new_k), v=tuple(new_v), segment_ids=k_segments,
                               next_position=layers.advance_positions(cache.next_position, positions, segment_ids),
                               index=cache.index + t, memory_slots=cache.memory_slots)
        return x, cache

    def unembedding(self) -> jax.Array:
        return (self.embed if self.cfg.tie_embeddings else self.unembed)[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Full-vocabulary logits (float32)."""
        return layers.vocab_logits(hidden, self.unembedding())

    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))


def _project(x: jax.Array, weight: jax.Array, lora: dict, scale: float, name: str) -> jax.Array:
    """`x [B,T,in] @ weight [in, *out]` plus the row's LoRA delta for projection `name`."""
    y = jnp.einsum("btd,d...->bt...", x, weight)
    if name not in lora:
        return y
    a, b = lora[name]
    low = jnp.einsum("bti,bir->btr", x, a.astype(x.dtype))
    return y + (jnp.einsum("btr,bro->bto", low, b.astype(x.dtype)) * scale).reshape(y.shape)


def _block(cfg: ModelConfig, blk: CompactBlock, x, lora: dict, scale: float, kv, mask, cos, sin, dtype):
    """One compacted pre-norm block; `kv` is `(k, v, write_index)` of the cache, or memory `(k, v, None)`."""
    norm = functools.partial(layers.rms_norm, eps=cfg.norm_eps, offset=cfg.norm_offset)
    w = {name: var[...].astype(dtype) for name, var in vars(blk).items() if isinstance(var, nnx.Param)}

    if blk.num_heads:
        h = norm(x, w["attn_norm"])
        q = _project(h, w["wq"], lora, scale, "q")
        k = _project(h, w["wk"], lora, scale, "k")
        v = _project(h, w["wv"], lora, scale, "v")
        if cfg.qkv_bias:
            q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
        if cfg.qk_norm:
            q, k = norm(q, w["q_norm"]), norm(k, w["k_norm"])
        q = layers.apply_rope(q, cos, sin)
        k = layers.apply_rope(k, cos, sin)
        if kv is None:
            k_all, v_all = k, v
        elif kv[2] is None:  # memory prepended, no cache
            k_all, v_all = jnp.concatenate([kv[0], k], axis=1), jnp.concatenate([kv[1], v], axis=1)
        else:
            k_all = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, kv[2], 0, 0))
            v_all = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, kv[2], 0, 0))
            kv = (k_all, v_all)
        k_att, v_att = k_all, v_all
        if not blk.grouped:  # ragged groups: one K/V per query head
            index = jnp.asarray(blk.kv_of_head, jnp.int32)
            k_att, v_att = jnp.take(k_all, index, axis=2), jnp.take(v_all, index, axis=2)
        ctx = layers.attend(q, k_att, v_att, mask, cfg.attn_scale)
        b, t = ctx.shape[:2]
        attn = _project(ctx.reshape(b, t, -1), w["wo"].reshape(-1, cfg.d_model), lora, scale, "o")
        if cfg.post_norms:
            attn = norm(attn, w["attn_post_norm"])
        x = x + attn
    elif kv is not None and kv[2] is not None:
        kv = (kv[0], kv[1])

    if blk.num_neurons:
        h = norm(x, w["mlp_norm"])
        gate = _project(h, w["w_gate"], lora, scale, "gate")
        up = _project(h, w["w_up"], lora, scale, "up")
        act = jax.nn.gelu(gate, approximate=True) if cfg.activation == "gelu_tanh" else jax.nn.silu(gate)
        mlp = _project(act * up, w["w_down"], lora, scale, "down")
        if cfg.post_norms:
            mlp = norm(mlp, w["mlp_post_norm"])
        x = x + mlp
    return x, kv
