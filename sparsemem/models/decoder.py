"""One Flax NNX decoder for Llama-3.x, Qwen2.5, Qwen3 and Gemma-3, chosen by `ModelConfig`.

Layer weights are stacked along a leading `layers` axis and the forward scans over
them (`lax.scan`), so compile time does not grow with depth and per-layer hook
arrays (`Hooks`) slice naturally. Every parameter carries `logical_axes` metadata
for `sparsemem.parallel`; the main activations are constrained by logical name.

The same `__call__` serves training (packed sequences: `segment_ids` keep
documents apart, `positions` restart per document) and cached generation (pass a
`KVCache`: the new tokens are written at `cache.index` and attend to every filled slot).
`gate_activity` runs the same blocks and returns per-layer MLP gate statistics instead.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx, struct

from sparsemem.models import forward, layers
from sparsemem.models.config import ModelConfig, layer_shapes
from sparsemem.models.hooks import Hooks, LayerHooks

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

    @property
    def write_index(self) -> jax.Array:
        """Key slot of the next token (every slot holds a token)."""
        return self.index


def _param(rngs: nnx.Rngs, shape, axes, dtype, init: Literal["normal", "zeros", "ones"] = "normal"):
    if init == "normal":
        value = 0.02 * jax.random.normal(rngs.params(), shape, dtype)
    else:
        value = (jnp.zeros if init == "zeros" else jnp.ones)(shape, dtype)
    return nnx.Param(value, logical_axes=axes)


# Logical axes of every stacked layer weight: the one declaration that sharding and compaction read.
LAYER_AXES: dict[str, tuple[str, ...]] = {
    "attn_norm": ("layers", "norm"), "mlp_norm": ("layers", "norm"),
    "attn_post_norm": ("layers", "norm"), "mlp_post_norm": ("layers", "norm"),
    "wq": ("layers", "embed", "heads", "head_dim"), "wk": ("layers", "embed", "kv_heads", "head_dim"),
    "wv": ("layers", "embed", "kv_heads", "head_dim"), "wo": ("layers", "heads", "head_dim", "embed"),
    "bq": ("layers", "heads", "head_dim"), "bk": ("layers", "kv_heads", "head_dim"),
    "bv": ("layers", "kv_heads", "head_dim"),
    "q_norm": ("layers", "norm"), "k_norm": ("layers", "norm"),
    "w_gate": ("layers", "embed", "mlp"), "w_up": ("layers", "embed", "mlp"), "w_down": ("layers", "mlp", "embed"),
}


class DecoderLayers(nnx.Module):
    """All transformer blocks, weights stacked on a leading layer axis (logical axes: `LAYER_AXES`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        norm_init = "zeros" if cfg.norm_offset else "ones"
        for name, shape in layer_shapes(cfg).items():  # projections draw their keys in this order
            init = norm_init if "norm" in name else "zeros" if name in ("bq", "bk", "bv") else "normal"
            setattr(self, name, _param(rngs, (cfg.num_layers,) + shape, LAYER_AXES[name], param_dtype, init))

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
        hooks = hooks if hooks is not None else Hooks()
        x, inputs = forward.prologue(cfg, self.embed[...], tokens, dtype=self.dtype, positions=positions,
                                     segment_ids=segment_ids, cache=cache, memory_slots=hooks.memory_slots)

        def layer(x, xs):
            weights, is_local, layer_hooks, cache_kv = xs
            return forward.block(cfg, weights, x, inputs, is_local=is_local, hooks=layer_hooks, cache_kv=cache_kv)

        if self.remat != "none":
            policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if self.remat == "dots" else None
            layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)

        xs = (self.layers.weights(), jnp.asarray(cfg.is_local), hooks.per_layer(),
              (cache.k, cache.v) if cache is not None else None)
        x, new_kv = jax.lax.scan(layer, x, xs)

        x = layers.rms_norm(x, self.final_norm[...], cfg.norm_eps, cfg.norm_offset)
        if cache is not None:
            cache = cache.replace(k=new_kv[0], v=new_kv[1], **inputs.advance(cache))
        return x, cache

    def gate_activity(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                      segment_ids: jax.Array | None = None) -> jax.Array:
        """`[L, B, F]` int32: per layer and row, on how many real tokens (segment > 0) each MLP
        neuron's gate pre-activation is positive, from one forward without hooks.

        What neuron statistics read (`sparsemem.analysis.lape`). The count is reduced inside
        the layer scan, so nothing `[L, B, T, F]`-sized is kept. A method of its own rather than
        an option of `__call__`, so the training and generation program stays as it is.
        """
        cfg, no_hooks = self.cfg, LayerHooks()
        x, inputs = forward.prologue(cfg, self.embed[...], tokens, dtype=self.dtype, positions=positions,
                                     segment_ids=segment_ids, cache=None)
        real = (inputs.segment_ids > 0)[..., None]

        def layer(x, xs):
            weights, is_local = xs
            x, _ = forward.attention(cfg, weights, x, inputs, is_local=is_local, hooks=no_hooks)
            x, gate = forward.mlp(cfg, weights, x, hooks=no_hooks)
            return x, jnp.sum((gate > 0) & real, axis=1, dtype=jnp.int32)

        return jax.lax.scan(layer, x, (self.layers.weights(), jnp.asarray(cfg.is_local)))[1]

    def unembedding(self) -> jax.Array:
        """The `[V, d]` output projection (the embedding when tied)."""
        return (self.embed if self.cfg.tie_embeddings else self.unembed)[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Full-vocabulary logits (float32). For losses use `sparsemem.models.loss` (chunked)."""
        return layers.vocab_logits(hidden, self.unembedding())

