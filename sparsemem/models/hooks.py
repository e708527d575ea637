"""The seam between the decoder and KOFF: what outside code may inject into a forward.

The decoder knows nothing of gates, domains or optimisers. It accepts a `Hooks`
value whose fields are all optional; a field left as `None` costs nothing (the
corresponding branch is not traced). Every field has a leading layer axis so the
decoder can scan over layers.

- `head_scale [L, H]` or per example `[B, L, H]`: multiplies each query head's context
  vector before `o_proj` (pruning gate or mask of attention heads).
- `neuron_scale [L, F]` or per example `[B, L, F]`: multiplies each MLP neuron
  `act(gate) * up` before `down_proj` (pruning gate or mask of MLP neurons).
- `memory_k`, `memory_v [B, L, M, Hkv, Dh]`: extra key/value slots per layer and
  example, a prefix at positions `0..M-1`: global layers always attend to them,
  sliding-window layers while slot `j` is inside the window (`position - j < window`),
  exactly as they would to the prefix tokens. Memory keys are used exactly as given:
  no RoPE is applied to them at attention time. Keys taken from the model's own KV
  cache (the default initialisation) therefore carry the positions they were computed
  at, baked in.
- `lora[name]`: an additive low-rank delta `x @ a @ b * scale` on projection `name`
  (one of `PROJECTIONS`), per example: `a [B, L, in, r]`, `b [B, L, r, out]` with
  the flat in/out sizes of that projection. The `down` and `o` deltas see the same
  (already scaled) input as the projection itself, so a pruned unit contributes
  nothing through its adapter either and compaction stays exact.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
from flax import struct

from sparsemem.models.config import ModelConfig, layer_shapes

# The layer weight each projection's LoRA delta adds to (`models.config.layer_shapes` names).
PROJECTION_WEIGHTS = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up", "down": "w_down"}
PROJECTIONS = tuple(PROJECTION_WEIGHTS)


def projection_shape(cfg: ModelConfig, name: str) -> tuple[int, int]:
    """Flat (in, out) feature sizes of projection `name` for LoRA deltas (`o` reads heads x head_dim)."""
    if name not in PROJECTION_WEIGHTS:
        raise ValueError(f"Unknown projection {name!r}; choose from {PROJECTIONS}")
    shape = layer_shapes(cfg)[PROJECTION_WEIGHTS[name]]
    in_dims = 2 if name == "o" else 1
    return math.prod(shape[:in_dims]), math.prod(shape[in_dims:])


@struct.dataclass
class LoRADelta:
    """Per-example low-rank delta on one projection: `x @ a @ b * scale`."""

    a: jax.Array  # [B, L, in, r] in `Hooks`; [B, in, r] in `LayerHooks`
    b: jax.Array  # [B, L, r, out] in `Hooks`; [B, r, out] in `LayerHooks`
    scale: float = struct.field(pytree_node=False, default=1.0)


@struct.dataclass
class Hooks:
    """Optional per-layer interventions in the decoder forward (see module docstring)."""

    head_scale: jax.Array | None = None
    neuron_scale: jax.Array | None = None
    memory_k: jax.Array | None = None
    memory_v: jax.Array | None = None
    lora: Mapping[str, LoRADelta] = struct.field(default_factory=dict)

    def __post_init__(self):
        if (self.memory_k is None) != (self.memory_v is None):
            raise ValueError("Hooks.memory_k and Hooks.memory_v must be given together")
        unknown = set(self.lora) - set(PROJECTIONS)
        if unknown:
            raise ValueError(f"Unknown LoRA projection(s) {sorted(unknown)}; choose from {PROJECTIONS}")

    @property
    def memory_slots(self) -> int:
        return self.memory_k.shape[2] if self.memory_k is not None else 0

    def per_layer(self) -> "LayerHooks":
        """These hooks as `LayerHooks` stacked on a leading layer axis, ready for `lax.scan` over layers."""
        def layer_first(x):
            return None if x is None else jax.numpy.moveaxis(x, 1, 0)

        def scale_layer_first(x):  # [L, U] stays; per example [B, L, U] -> [L, B, U]
            return layer_first(x) if x is not None and x.ndim == 3 else x

        return LayerHooks(head_scale=scale_layer_first(self.head_scale),
                          neuron_scale=scale_layer_first(self.neuron_scale),
                          memory_k=layer_first(self.memory_k), memory_v=layer_first(self.memory_v),
                          lora={name: LoRADelta(layer_first(d.a), layer_first(d.b), d.scale)
                                for name, d in self.lora.items()})


@struct.dataclass
class LayerHooks:
    """The hooks of one layer, as a block applies them: `Hooks` without the layer axis.

    `head_scale [H]` or `[B, H]`, `neuron_scale [F]` or `[B, F]`, `memory_k/v [B, M, Hkv, Dh]`, `lora[name]` with
    `a [B, in, r]`, `b [B, r, out]`; all optional.
    """

    head_scale: jax.Array | None = None
    neuron_scale: jax.Array | None = None
    memory_k: jax.Array | None = None
    memory_v: jax.Array | None = None
    lora: Mapping[str, LoRADelta] = struct.field(default_factory=dict)
