"""The compacted decoder: per-layer weights of different widths, memory slots at the front of the cache.

Layout choice: pruning leaves every layer with its own number of query heads, KV
heads and MLP neurons, so the stacked-layer scan of `Decoder` does not fit. Padding
each layer to the widest one would give back much of the saving (one wide layer
pads all others), so the compacted model is an unrolled loop over `CompactBlock`s
with exactly the kept units; compile time grows with depth, which serving pays once.
Each block runs `models.forward.block`, the decoder's own block, which reads the
widths from the weights it is given.

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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from sparsemem.models import forward, layers
from sparsemem.models.config import ModelConfig
from sparsemem.models.hooks import LayerHooks, LoRADelta


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

    def layer_hooks(self, layer: int, *, with_kv: bool) -> LayerHooks:
        """`layer`'s LoRA deltas and, `with_kv`, its KV slots in front of the keys (without a cache)."""
        lora = ({name: LoRADelta(a, b, self.lora_scale) for name, (a, b) in self.lora[layer].items()}
                if self.lora else {})
        if with_kv and self.k:
            return LayerHooks(memory_k=self.k[layer], memory_v=self.v[layer], lora=lora)
        return LayerHooks(lora=lora)


@struct.dataclass
class ServeCache:
    """Per-layer keys/values `[B, M + S, K'_l, Dh]`: M memory slots, then S token slots.

    `segment_ids [B, S]`, `next_position [B]` and `index` (token slots written) as in `KVCache`;
    `memory_visible [B]` (with memory slots) says which rows attend to theirs, so a row
    without a domain can share a batch with rows that have one.
    """

    k: tuple
    v: tuple
    segment_ids: jax.Array
    next_position: jax.Array
    index: jax.Array
    memory_visible: jax.Array | None = None
    memory_slots: int = struct.field(pytree_node=False, default=0)

    @property
    def write_index(self) -> jax.Array:
        """Key slot of the next token: token slots follow the memory slots."""
        return self.memory_slots + self.index


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

    def weights(self) -> dict[str, jax.Array]:
        """The block's weight arrays by name (what `forward.block` consumes)."""
        return {name: var[...] for name, var in vars(self).items() if isinstance(var, nnx.Param)}

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

    def init_cache(self, batch: int, max_len: int, memory: RowMemory | None = None,
                   memory_visible: jax.Array | None = None) -> ServeCache:
        """An empty cache for `max_len` tokens, starting with `memory`'s KV slots (if any), visible to the rows
        where `memory_visible [B]` is true (default: all)."""
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
                          memory_visible=(jnp.ones((batch,), bool) if memory_visible is None
                                          else jnp.asarray(memory_visible, bool)) if m else None,
                          memory_slots=m)

    def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, memory: RowMemory | None = None,
                 cache: ServeCache | None = None) -> tuple[jax.Array, ServeCache | None]:
        """Final hidden states `[B, T, d]` and the updated cache.

        Without a cache, `memory`'s KV slots are prepended to every layer's keys (and
        default positions start after them); with a cache they must already be in it
        (`init_cache(..., memory)`), and only `memory`'s LoRA is used here.
        """
        if cache is not None and memory is not None and memory.slots not in (0, cache.memory_slots):
            raise ValueError(f"memory has {memory.slots} KV slots but the cache was made with "
                             f"{cache.memory_slots}; pass the same memory to init_cache")
        cfg = self.cfg
        slots = memory.slots if memory is not None else 0
        x, inputs = forward.prologue(cfg, self.embed[...], tokens, dtype=self.dtype, positions=positions,
                                     segment_ids=segment_ids, cache=cache, first_position=slots,
                                     memory_slots=cache.memory_slots if cache is not None else slots)
        if cache is not None and cache.memory_visible is not None:
            inputs = _hide_memory(inputs, cache.memory_slots, cache.memory_visible)
        new_k, new_v = [], []
        for i, blk in enumerate(self.blocks):
            hooks = memory.layer_hooks(i, with_kv=cache is None) if memory is not None else LayerHooks()
            x, cache_kv = forward.block(cfg, blk.weights(), x, inputs, is_local=blk.is_local, hooks=hooks,
                                        cache_kv=(cache.k[i], cache.v[i]) if cache is not None else None,
                                        kv_of_head=None if blk.grouped else blk.kv_of_head)
            if cache is not None:
                new_k.append(cache_kv[0])
                new_v.append(cache_kv[1])

        x = layers.rms_norm(x, self.final_norm[...], cfg.norm_eps, cfg.norm_offset)
        if cache is not None:
            cache = cache.replace(k=tuple(new_k), v=tuple(new_v), **inputs.advance(cache))
        return x, cache

    def unembedding(self) -> jax.Array:
        return (self.embed if self.cfg.tie_embeddings else self.unembed)[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Full-vocabulary logits (float32)."""
        return layers.vocab_logits(hidden, self.unembedding())

    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))



def _hide_memory(inputs: forward.Inputs, slots: int, visible: jax.Array) -> forward.Inputs:
    """`inputs` with the first `slots` keys masked for the rows where `visible [B]` is false."""
    def hide(mask):
        if mask is None:
            return None
        return mask.at[:, :, :slots].set(mask[:, :, :slots] & visible[:, None, None])
    return inputs.replace(global_mask=hide(inputs.global_mask), local_mask=hide(inputs.local_mask))
