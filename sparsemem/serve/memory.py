"""Domain memory for serving: the table sliced to a compacted backbone, per-row gathers, host offload.

A `MemoryBank` holds D domains' modules in the widths of one `CompactLayout`
(per layer: `k, v [D, M, K', Dh]`, `{proj}_a [D, in', r]`, `{proj}_b [D, r, out']`).
`rows(domains)` gives the `RowMemory` of a batch whose rows may use different
domains: the batch's *distinct* domains are fetched once, then expanded per row.

With `offload=True` the table lives in host memory (`pinned_host`) and only the
fetched rows move to the device: each row is a dynamic slice of the host array
transferred inside one jitted program, so the copy is an async DMA that overlaps
with whatever the device is running (e.g. prefetch the next batch's rows while the
current one decodes: dispatch `fetch` first, consume later).
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from sparsemem.models.config import ModelConfig
from sparsemem.serve.compaction import CompactLayout
from sparsemem.serve.compact_decoder import RowMemory


class UnknownDomainError(ValueError):
    """A requested domain has no memory module in the bank."""


def slice_module(cfg: ModelConfig, layout: CompactLayout, arrays: Mapping[str, np.ndarray],
                 layer: int) -> dict[str, np.ndarray]:
    """One layer of full-width module arrays (`k [.., L, M, Hkv, Dh]`, `q_a [.., L, in, r]`, ...) cut to `layout`.

    Leading axes before the layer axis (a domain axis, or none) are kept.
    """
    heads, kv, neurons = (np.asarray(x, np.int64) for x in (layout.heads[layer], layout.kv_heads[layer],
                                                           layout.neurons[layer]))
    H, Hkv = cfg.num_heads, cfg.num_kv_heads
    # name -> (feature axis from the end, kept units, units on that axis when each spans head_dim features)
    rules = {"k": (2, kv, None), "v": (2, kv, None), "q_b": (1, heads, H), "k_b": (1, kv, Hkv), "v_b": (1, kv, Hkv),
             "o_a": (2, heads, H), "gate_b": (1, neurons, None), "up_b": (1, neurons, None),
             "down_a": (2, neurons, None)}
    out = {}
    for name, x in arrays.items():
        x = _layer(np.asarray(x), name, layer)
        if name in rules:
            back, units, count = rules[name]
            axis = x.ndim - back
            if count is None:
                x = np.take(x, units, axis=axis)
            else:  # flat head features: split into (heads, head_dim), keep heads, flatten again
                split = x.reshape(x.shape[:axis] + (count, -1) + x.shape[axis + 1:])
                x = np.take(split, units, axis=axis).reshape(x.shape[:axis] + (-1,) + x.shape[axis + 1:])
        out[name] = x
    return out


def _layer(x: np.ndarray, name: str, layer: int) -> np.ndarray:
    """Select `layer` from a module array: KV memory has 3 axes after the layer axis, LoRA 2."""
    return np.take(x, layer, axis=x.ndim - (4 if name in ("k", "v") else 3))


class MemoryBank:
    """The memory modules of named domains, cut to one compacted backbone; see the module docstring."""

    def __init__(self, cfg: ModelConfig, layout: CompactLayout, domains: Sequence[str],
                 table: Mapping[str, np.ndarray], lora_scale: float, *, offload: bool = False,
                 device: jax.Device | None = None):
        """`table`: full-width arrays with a leading domain axis (`k [D, L, M, Hkv, Dh]`, `q_a [D, L, in, r]`, ...)."""
        self.domains = tuple(domains)
        if len(set(self.domains)) != len(self.domains):
            raise ValueError(f"duplicate domain names in {self.domains}")
        sizes = {name: np.shape(x)[0] for name, x in table.items()}
        if any(s != len(self.domains) for s in sizes.values()):
            raise ValueError(f"memory table rows {sizes} do not match the {len(self.domains)} domains "
                             f"{list(self.domains)}")
        self.cfg, self.layout, self.lora_scale, self.offload = cfg, layout, float(lora_scale), offload
        device = device or jax.local_devices()[0]
        self.device_sharding = SingleDeviceSharding(device, memory_kind="device")
        self.table_sharding = SingleDeviceSharding(device, memory_kind="pinned_host" if offload else "device")
        self.layers = tuple(
            {name: jax.device_put(x, self.table_sharding) for name, x in slice_module(cfg, layout, table, i).items()}
            for i in range(cfg.num_layers))
        self._fetch = jax.jit(functools.partial(_fetch_rows, device=self.device_sharding) if offload else _take_rows)

    @property
    def slots(self) -> int:
        return self.layers[0]["k"].shape[1] if "k" in self.layers[0] else 0

    def domain_ids(self, names: Sequence[str]) -> np.ndarray:
        unknown = sorted({n for n in names if n not in self.domains})
        if unknown:
            raise UnknownDomainError(f"unknown domain(s) {unknown}; known domains: {', '.join(self.domains)}")
        return np.asarray([self.domains.index(n) for n in names], np.int32)

    def fetch(self, ids: Sequence[int]) -> tuple[dict[str, jax.Array], ...]:
        """Rows `ids` of every layer's arrays, on the device (dispatched asynchronously)."""
        return self._fetch(self.layers, jnp.asarray(np.asarray(ids, np.int32)))

    def rows(self, names: Sequence[str]) -> RowMemory:
        """Per-row memory of a batch whose row `i` uses domain `names[i]`."""
        ids = self.domain_ids(names)
        distinct, inv = np.unique(ids, return_inverse=True)
        fetched = self.fetch(distinct)
        return expand_rows(fetched, jnp.asarray(inv.reshape(-1), jnp.int32), self.lora_scale)


def expand_rows(fetched: tuple[dict[str, jax.Array], ...], inv: jax.Array, lora_scale: float) -> RowMemory:
    """`RowMemory` with row `i` taken from fetched row `inv[i]`."""
    per_row = _expand(fetched, inv)
    k = tuple(layer["k"] for layer in per_row) if "k" in per_row[0] else ()
    v = tuple(layer["v"] for layer in per_row) if "v" in per_row[0] else ()
    lora = tuple({name[:-2]: (layer[name], layer[name[:-2] + "_b"]) for name in layer if name.endswith("_a")}
                 for layer in per_row)
    return RowMemory(k=k, v=v, lora=lora if any(lora) else (), lora_scale=lora_scale)


@jax.jit
def _expand(fetched, inv):
    return jax.tree.map(lambda x: jnp.take(x, inv, axis=0), fetched)


def _take_rows(layers, ids):
    return jax.tree.map(lambda x: jnp.take(x, ids, axis=0), layers)


def _fetch_rows(layers, ids, device):
    """Host-resident rows -> `device`: one dynamic slice per row (a gather cannot read host memory)."""
    def one(x):
        rows = [jax.lax.dynamic_index_in_dim(x, ids[i], keepdims=True) for i in range(ids.shape[0])]
        return jnp.concatenate([jax.device_put(r, device) for r in rows])
    return jax.tree.map(one, layers)
