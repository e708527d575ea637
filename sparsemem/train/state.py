"""The KOFF train state: only gates, memory rows and multipliers (plus their optimiser state).

The frozen backbone is *not* part of it: it is passed to the steps as a separate,
non-donated argument and never enters an optimiser. All trainables are float32;
groups are plain dicts of arrays named like the `Koff` module's variables.
"""

from __future__ import annotations

import jax
import optax
from flax import struct

from sparsemem.koff.rowsparse import RowAdamState


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    rng: jax.Array  # uint32 raw key data; step `s` uses fold_in(rng, s), so runs resume exactly
    gates: dict[str, jax.Array]  # log_alpha: head [L,H], neuron [L,F] (+ attn, mlp [L])
    memory: dict[str, jax.Array]  # the memory table: k, v [D,L,M,Hkv,Dh]; {proj}_a, {proj}_b
    multipliers: dict[str, jax.Array]  # lambda1, lambda2 (scalars)
    gate_opt: optax.OptState
    lambda_opt: optax.OptState
    memory_opt: RowAdamState

    @property
    def num_domains(self) -> int:
        return self.memory_opt.count.shape[0]
