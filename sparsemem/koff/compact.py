"""Physically remove pruned heads, KV heads and neurons from the decoder's stacked weights.

Layers keep different numbers of units, so the result is one dict of arrays per
layer. Query heads keep their order; `kv_of_head [H']` says which kept KV head
each kept query head reads (grouped-query attention with ragged groups). A KV
head is kept while any query head of its group is. Weights not owned by a unit
(norms) are copied.
"""

from __future__ import annotations

import jax
import numpy as np

from sparsemem.koff.gates import scales
from sparsemem.models.config import ModelConfig

_HEAD_AXIS = {"wq": 1, "wo": 0, "bq": 0}
_KV_AXIS = {"wk": 1, "wv": 1, "bk": 0, "bv": 0}
_NEURON_AXIS = {"w_gate": 1, "w_up": 1, "w_down": 0}
PRUNABLE = tuple(_HEAD_AXIS) + tuple(_KV_AXIS) + tuple(_NEURON_AXIS)


def compact(cfg: ModelConfig, weights: dict[str, jax.Array],
            masks: dict[str, jax.Array]) -> list[dict[str, np.ndarray]]:
    """Per-layer weights with only the kept units; `weights` as from `DecoderLayers.weights()`.

    `masks` are 0/1 gate masks (`head [L, H]`, `neuron [L, F]`, optional `attn`,
    `mlp [L]`) as from `sparsity.deterministic_masks`.
    """
    head_keep, neuron_keep = (np.asarray(m) > 0 for m in scales(masks))
    if head_keep.shape != (cfg.num_layers, cfg.num_heads) or neuron_keep.shape != (cfg.num_layers, cfg.d_ff):
        raise ValueError(f"masks of shape head {head_keep.shape}, neuron {neuron_keep.shape} do not fit the "
                         f"model: expected {(cfg.num_layers, cfg.num_heads)} and {(cfg.num_layers, cfg.d_ff)}")
    weights = {name: np.asarray(w) for name, w in weights.items()}
    layers = []
    for layer in range(cfg.num_layers):
        heads = np.flatnonzero(head_keep[layer])
        groups = heads // cfg.group_size
        kv_heads = np.unique(groups)
        neurons = np.flatnonzero(neuron_keep[layer])
        out = {"kv_of_head": np.searchsorted(kv_heads, groups)}
        for name, w in weights.items():
            w = w[layer]
            if name in _HEAD_AXIS:
                w = np.take(w, heads, axis=_HEAD_AXIS[name])
            elif name in _KV_AXIS:
                w = np.take(w, kv_heads, axis=_KV_AXIS[name])
            elif name in _NEURON_AXIS:
                w = np.take(w, neurons, axis=_NEURON_AXIS[name])
            out[name] = w
        layers.append(out)
    return layers


def prunable_size(layers: list[dict[str, np.ndarray]]) -> int:
    """Number of prunable parameters (projections and their biases) left in compacted layers."""
    return sum(layer[name].size for layer in layers for name in PRUNABLE if name in layer)
