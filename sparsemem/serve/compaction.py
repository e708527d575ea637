"""Compaction for serving: kept-unit layout, hardware-friendly width rounding, `Decoder` -> `CompactDecoder`.

The physical slicing of the stacked weights is `sparsemem.koff.weight_slicing.compact`;
this module adds what serving needs around it: the layout of kept units (to slice
memory modules and to save/load the backbone), rounding kept widths up to a
multiple (e.g. 128 lanes) by keeping the next-best pruned units, and assembling
the `CompactDecoder`.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from sparsemem.koff import weight_slicing
from sparsemem.models.config import ModelConfig
from sparsemem.models.decoder import Decoder
from sparsemem.serve.compact_decoder import CompactBlock, CompactDecoder


@dataclasses.dataclass(frozen=True)
class CompactLayout:
    """Original indices of the kept query heads, KV heads and MLP neurons of every layer."""

    heads: tuple[tuple[int, ...], ...]
    kv_heads: tuple[tuple[int, ...], ...]
    neurons: tuple[tuple[int, ...], ...]

    @classmethod
    def from_masks(cls, cfg: ModelConfig, masks: dict) -> "CompactLayout":
        """From 0/1 gate masks (`head [L, H]`, `neuron [L, F]`, optional block masks `attn`, `mlp [L]`)."""
        head_keep, neuron_keep = weight_slicing.kept_units(cfg, masks)
        heads = tuple(tuple(int(h) for h in np.flatnonzero(row)) for row in head_keep)
        kv = tuple(tuple(sorted({h // cfg.group_size for h in row})) for row in heads)
        neurons = tuple(tuple(int(n) for n in np.flatnonzero(row)) for row in neuron_keep)
        return cls(heads, kv, neurons)

    @classmethod
    def full(cls, cfg: ModelConfig) -> "CompactLayout":
        """Every unit kept (the dense model)."""
        return cls.from_masks(cfg, {"head": np.ones((cfg.num_layers, cfg.num_heads)),
                                    "neuron": np.ones((cfg.num_layers, cfg.d_ff))})

    def kv_of_head(self, cfg: ModelConfig, layer: int) -> tuple[int, ...]:
        """For each kept query head of `layer`, the position of its KV head among the kept ones."""
        kv = self.kv_heads[layer]
        return tuple(kv.index(h // cfg.group_size) for h in self.heads[layer])

    def masks(self, cfg: ModelConfig) -> dict[str, np.ndarray]:
        """The 0/1 `head [L, H]` and `neuron [L, F]` masks this layout keeps."""
        head = np.zeros((cfg.num_layers, cfg.num_heads), np.float32)
        neuron = np.zeros((cfg.num_layers, cfg.d_ff), np.float32)
        for layer in range(cfg.num_layers):
            head[layer, list(self.heads[layer])] = 1
            neuron[layer, list(self.neurons[layer])] = 1
        return {"head": head, "neuron": neuron}

    def widths(self) -> list[dict[str, int]]:
        return [{"heads": len(h), "kv_heads": len(k), "neurons": len(n)}
                for h, k, n in zip(self.heads, self.kv_heads, self.neurons)]

    def to_json(self) -> dict:
        return {"heads": [list(x) for x in self.heads], "kv_heads": [list(x) for x in self.kv_heads],
                "neurons": [list(x) for x in self.neurons]}

    @classmethod
    def from_json(cls, data: dict) -> "CompactLayout":
        return cls(*(tuple(tuple(int(i) for i in row) for row in data[key]) for key in ("heads", "kv_heads",
                                                                                         "neurons")))


def _round_up(keep: np.ndarray, score: np.ndarray, multiple: int) -> np.ndarray:
    """`keep` (one layer, 0/1) plus the best-scoring dropped units until the count is a multiple."""
    count = int(keep.sum())
    want = min(math.ceil(count / multiple) * multiple, keep.size)
    dropped = np.flatnonzero(~keep)
    best = dropped[np.argsort(-score[dropped], kind="stable")][: want - count]
    out = keep.copy()
    out[best] = True
    return out


def round_masks(cfg: ModelConfig, masks: dict, scores: dict, multiple: int) -> dict[str, np.ndarray]:
    """Masks whose kept widths are multiples of `multiple` features, keeping the next-best units.

    MLP widths count neurons; attention widths count `heads * head_dim` features, so
    the number of heads is rounded to a multiple of `multiple / gcd(multiple, head_dim)`.
    A layer keeps at most all of its units. `scores` rank units (`head [L, H]`,
    `neuron [L, F]`, e.g. keep probabilities); block masks are folded into the units.
    """
    if multiple < 1:
        raise ValueError(f"round_to must be >= 1, got {multiple}")
    head_keep, neuron_keep = weight_slicing.kept_units(cfg, masks)
    head_multiple = multiple // math.gcd(multiple, cfg.head_dim)
    head = np.stack([_round_up(k, np.asarray(s), head_multiple) for k, s in zip(head_keep, scores["head"])])
    neuron = np.stack([_round_up(k, np.asarray(s), multiple) for k, s in zip(neuron_keep, scores["neuron"])])
    return {"head": head.astype(np.float32), "neuron": neuron.astype(np.float32)}


def build_compact(cfg: ModelConfig, layout: CompactLayout, layer_weights: list[dict[str, np.ndarray]],
                  embed, final_norm, unembed=None, dtype=None) -> CompactDecoder:
    """A `CompactDecoder` from per-layer weights already sliced to `layout`."""
    blocks = [CompactBlock(weights, layout.kv_of_head(cfg, i), cfg.is_local[i])
              for i, weights in enumerate(layer_weights)]
    return CompactDecoder(cfg, embed, final_norm, unembed, blocks, dtype=dtype or jnp.float32)


def compact_decoder(decoder: Decoder, layout: CompactLayout) -> CompactDecoder:
    """The physically compacted `decoder`: only `layout`'s units, same function as the masked model."""
    cfg = decoder.cfg
    per_layer = weight_slicing.compact(cfg, decoder.layers.weights(), layout.masks(cfg))
    for i, weights in enumerate(per_layer):
        if tuple(weights.pop("kv_of_head").tolist()) != layout.kv_of_head(cfg, i):
            raise AssertionError(f"koff.weight_slicing and the serving layout disagree on layer {i}'s KV groups")
    unembed = None if cfg.tie_embeddings else decoder.unembed[...]
    return build_compact(cfg, layout, per_layer, decoder.embed[...], decoder.final_norm[...], unembed,
                         dtype=decoder.dtype)


def prunable_params(model: CompactDecoder) -> int:
    """Prunable parameters (projections and their biases) left in a compacted model."""
    return sum(int(np.prod(var.shape)) for blk in model.blocks for name, var in vars(blk).items()
               if name in weight_slicing.PRUNABLE)
