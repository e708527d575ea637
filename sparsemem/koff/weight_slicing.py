"""Physically remove pruned heads, KV heads and neurons from the decoder's stacked weights.

Layers keep different numbers of units, so the result is one dict of arrays per
layer. Query heads keep their order; `kv_of_head [H']` says which kept KV head
each kept query head reads (grouped-query attention with ragged groups). A KV
head is kept while any query head of its group is. Weights not owned by a unit
(norms) are copied. Which axis of which weight holds a unit is read from the
decoder's own declaration (`LAYER_AXES`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparsemem.koff.gates import scales
from sparsemem.models.config import ModelConfig
from sparsemem.models.decoder import LAYER_AXES

UNITS = ("heads", "kv_heads", "mlp")  # the logical axes whose entries pruning removes
# weight name -> (unit, axis of one layer's weight holding it), for every weight owned by units
_UNIT_AXIS = {name: (unit, axes.index(unit) - 1) for name, axes in LAYER_AXES.items() for unit in UNITS
              if unit in axes}
PRUNABLE = tuple(_UNIT_AXIS)


def kept_units(cfg: ModelConfig, masks: dict) -> tuple[np.ndarray, np.ndarray]:
    """Boolean `head [L, H]` and `neuron [L, F]` keep masks from 0/1 gate masks (block masks folded in)."""
    head_keep, neuron_keep = (np.asarray(m) > 0 for m in scales(masks))
    if head_keep.shape != (cfg.num_layers, cfg.num_heads) or neuron_keep.shape != (cfg.num_layers, cfg.d_ff):
        raise ValueError(f"masks of shape head {head_keep.shape}, neuron {neuron_keep.shape} do not fit the "
                         f"model: expected {(cfg.num_layers, cfg.num_heads)} and {(cfg.num_layers, cfg.d_ff)}")
    return head_keep, neuron_keep


def compact(cfg: ModelConfig, weights: dict[str, jax.Array],
            masks: dict[str, jax.Array]) -> list[dict[str, jax.Array]]:
    """Per-layer weights with only the kept units; `weights` as from `DecoderLayers.weights()`.

    `masks` are 0/1 gate masks (`head [L, H]`, `neuron [L, F]`, optional `attn`,
    `mlp [L]`) as from `sparsity.deterministic_masks`: concrete, since they fix the
    widths. The weights may be abstract (traced under `jax.eval_shape`), so a
    paper-size model's compaction can be checked without its weights.
    """
    head_keep, neuron_keep = kept_units(cfg, masks)
    layers = []
    for layer in range(cfg.num_layers):
        heads = np.flatnonzero(head_keep[layer])
        groups = heads // cfg.group_size
        kv_heads = np.unique(groups)
        neurons = np.flatnonzero(neuron_keep[layer])
        kept = {"heads": heads, "kv_heads": kv_heads, "mlp": neurons}
        out = {"kv_of_head": np.searchsorted(kv_heads, groups)}
        for name, w in weights.items():
            w = w[layer]
            if name in _UNIT_AXIS:
                unit, axis = _UNIT_AXIS[name]
                w = jnp.take(w, kept[unit], axis=axis)
            out[name] = w
        layers.append(out)
    return layers


def prunable_size(layers: list[dict[str, np.ndarray]]) -> int:
    """Number of prunable parameters (projections and their biases) left in compacted layers."""
    return sum(layer[name].size for layer in layers for name in PRUNABLE if name in layer)
