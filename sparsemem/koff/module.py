"""`Koff`: everything trainable in a KOFF run, as one NNX module.

Its variables are typed so filters pick the groups: `GateLogit` (gate lr, Adam),
`MemoryRow` (memory lr, row-sparse Adam) and `Multiplier` (lambda lr, ascent).
The decoder's own `nnx.Param`s live elsewhere and are never trained.
"""

from __future__ import annotations

import jax
from flax import nnx

from sparsemem.koff.config import KoffConfig
from sparsemem.koff.gates import Gates, GateLogit
from sparsemem.koff.memory import MemoryRow, MemoryTable
from sparsemem.koff.sparsity import Lagrangian, Multiplier
from sparsemem.models.config import ModelConfig

GROUPS = {"gates": GateLogit, "memory": MemoryRow, "multipliers": Multiplier}


class Koff(nnx.Module):
    def __init__(self, cfg: ModelConfig, kcfg: KoffConfig, *, rngs: nnx.Rngs):
        self.gates = Gates(cfg, block_gates=kcfg.block_gates, init_keep_prob=kcfg.init_keep_prob,
                           init_jitter=kcfg.init_jitter, key=jax.random.fold_in(jax.random.key(kcfg.seed), 1))
        self.memory = MemoryTable(cfg, kcfg.num_domains, slots=kcfg.memory_slots, lora_rank=kcfg.lora_rank,
                                  lora_targets=kcfg.lora_targets, init_std=kcfg.memory_init_std, rngs=rngs)
        self.lagrangian = Lagrangian()


def split(koff: Koff) -> tuple[nnx.GraphDef, dict[str, nnx.State]]:
    """`(graphdef, {"gates": ..., "memory": ..., "multipliers": ...})`, split by variable type."""
    graphdef, *states = nnx.split(koff, *GROUPS.values())
    return graphdef, dict(zip(GROUPS, states))
