"""The memory table: per-domain KV memory and LoRA adapters, stacked on a leading domain axis.

Row `d` of every array is domain `d`'s memory module. A step gathers only the rows
of the domains in its batch (`distinct_rows` + `gather_rows`), computes gradients
with respect to those gathered rows and scatters the updated rows back
(`sparsemem.koff.rowsparse`), so the cost of a step does not grow with the number
of domains and absent domains are never touched.

Memory keys carry no position of their own: the decoder applies no RoPE to them.
Prefill-initialised keys are post-RoPE keys of the frozen model at positions
0..M-1, so those positions are baked in at initialisation.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from sparsemem.models.config import ModelConfig
from sparsemem.models.hooks import Hooks, LoRADelta, projection_shape

KV_AXES = ("domain", "layers", "memory_slots", "kv_heads", "head_dim")
LORA_A_AXES = ("domain", "layers", "lora_in", "lora_rank")
LORA_B_AXES = ("domain", "layers", "lora_rank", "lora_out")


class MemoryRow(nnx.Param):
    """An array of the memory table (leading domain axis); updated row-sparsely."""


class MemoryTable(nnx.Module):
    """KV memory `k, v [D, L, M, Hkv, Dh]` and LoRA `{proj}_a [D, L, in, r]`, `{proj}_b [D, L, r, out]`.

    Keys/values start random (`init_std`); use `prefill_kv` to set them from the
    frozen model's own cache. LoRA `a` is N(0, 1/in), `b` is zero, so a fresh
    adapter is a no-op; its delta is scaled by `KoffConfig.lora_scale` (`alpha / r`).
    """

    def __init__(self, cfg: ModelConfig, num_domains: int, *, slots: int, lora_rank: int,
                 lora_targets: tuple[str, ...], init_std: float, rngs: nnx.Rngs):
        D, L = num_domains, cfg.num_layers
        self.lora_targets = tuple(lora_targets)
        if slots:
            shape = (D, L, slots, cfg.num_kv_heads, cfg.head_dim)
            self.k = MemoryRow(init_std * jax.random.normal(rngs.params(), shape), logical_axes=KV_AXES)
            self.v = MemoryRow(init_std * jax.random.normal(rngs.params(), shape), logical_axes=KV_AXES)
        for name in lora_targets:
            fan_in, fan_out = projection_shape(cfg, name)
            a = jax.random.normal(rngs.params(), (D, L, fan_in, lora_rank)) / math.sqrt(fan_in)
            setattr(self, f"{name}_a", MemoryRow(a, logical_axes=LORA_A_AXES))
            setattr(self, f"{name}_b", MemoryRow(jnp.zeros((D, L, lora_rank, fan_out)), logical_axes=LORA_B_AXES))


def distinct_rows(domain: jax.Array, num_domains: int) -> tuple[jax.Array, jax.Array]:
    """`(slots [K], inv [B])`: the sorted distinct domains of a batch, padded with `num_domains`.

    `K = min(B, D)` is static; `slots[inv] == domain`. Padding slots index past the
    table, so gathers fill them with zeros and scatters drop them.
    """
    size = min(domain.shape[0], num_domains)
    slots, inv = jnp.unique(domain, size=size, fill_value=num_domains, return_inverse=True)
    return slots, inv.reshape(domain.shape)


def gather_rows(tree, slots: jax.Array):
    """The rows `slots` of every array in `tree` (zeros for padding slots)."""
    return jax.tree.map(lambda x: jnp.take(x, slots, axis=0, mode="fill", fill_value=0), tree)


def scatter_rows(tree, slots: jax.Array, rows):
    """`tree` with rows `slots` replaced by `rows`; padding slots are dropped."""
    return jax.tree.map(lambda x, r: x.at[slots].set(r.astype(x.dtype), mode="drop"), tree, rows)


def hooks_from_rows(rows: Mapping[str, jax.Array], inv: jax.Array, lora_scale: float,
                    dtype: jnp.dtype | None = None) -> Hooks:
    """Per-example `Hooks` (memory + LoRA) from gathered rows `[K, ...]` and example->row index `inv [B]`."""
    per_example = {name: jnp.take(x, inv, axis=0) for name, x in rows.items()}
    if dtype is not None:
        per_example = {name: x.astype(dtype) for name, x in per_example.items()}
    lora = {name[:-2]: LoRADelta(per_example[name], per_example[name[:-2] + "_b"], lora_scale)
            for name in per_example if name.endswith("_a")}
    return Hooks(memory_k=per_example.get("k"), memory_v=per_example.get("v"), lora=lora)


@nnx.jit
def _prefill_chunk(decoder, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    batch, slots = tokens.shape
    _, cache = decoder(tokens, cache=decoder.init_cache(batch, slots))
    return jnp.moveaxis(cache.k, 1, 0), jnp.moveaxis(cache.v, 1, 0)


def prefill_kv(decoder, tokens: jax.Array, batch_size: int = 8) -> tuple[jax.Array, jax.Array]:
    """The frozen model's own keys/values over `tokens [D, M]`: `(k, v) [D, L, M, Hkv, Dh]` (float32).

    Runs a cached prefill of each domain's first M tokens, `batch_size` domains at a time.
    """
    ks, vs = zip(*(_prefill_chunk(decoder, tokens[start:start + batch_size])
                   for start in range(0, tokens.shape[0], batch_size)))
    return jnp.concatenate(ks).astype(jnp.float32), jnp.concatenate(vs).astype(jnp.float32)
