"""Per-row summed token losses of a trainer's frozen backbone under a mask and a memory table."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsemem.koff import gates as gates_lib
from sparsemem.koff.memory import hooks_from_rows
from sparsemem.models.hooks import Hooks
from sparsemem.models.loss import token_cross_entropy
from sparsemem.parallel.rules import axis_rules
from sparsemem.train.trainer import KoffTrainer


class Scorer:
    """Scores batches (`sparsemem.data` format) with the backbone of `trainer`.

    `masks` are 0/1 gate masks (`head`, `neuron`, ...) or None (dense); `memory` is a
    memory table `{name: [D, ...]}` (possibly a subset of its arrays) or None, and
    `memory_index [B]` picks each row's memory (default: the row's own domain).
    """

    def __init__(self, trainer: KoffTrainer):
        self.trainer = trainer
        self._fn = jax.jit(self._row_losses, static_argnums=(5,))

    def _row_losses(self, backbone, scales, table, index, batch, lora_scale):
        decoder = nnx.merge(self.trainer.decoder_def, backbone)
        memory = hooks_from_rows(table, index, lora_scale, decoder.dtype) if table else Hooks()
        head, neuron = scales if scales is not None else (None, None)
        hooks = Hooks(head_scale=head, neuron_scale=neuron, memory_k=memory.memory_k, memory_v=memory.memory_v,
                      lora=memory.lora)
        hidden, _ = decoder(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                            hooks=hooks)
        ce = token_cross_entropy(decoder, hidden, batch["targets"], chunk_size=self.trainer.kcfg.loss_chunk)
        mask = batch["loss_mask"]
        return jnp.sum(ce * mask, axis=1), jnp.sum(mask, axis=1)

    def row_losses(self, batch: Mapping[str, np.ndarray], masks: Mapping[str, jax.Array] | None = None,
                   memory: Mapping[str, jax.Array] | None = None, memory_index: np.ndarray | None = None,
                   lora_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """`(loss_sum [B], tokens [B])` in nats over each row's loss mask."""
        placed = self.trainer.place_batch(batch)
        index = placed["domain"] if memory_index is None else jnp.asarray(memory_index, jnp.int32)
        scales = gates_lib.scales(dict(masks)) if masks is not None else None
        with jax.set_mesh(self.trainer.mesh), axis_rules(self.trainer.rules):
            out = self._fn(self.trainer.backbone, scales, dict(memory) if memory else {}, index, placed,
                           float(lora_scale))
        return tuple(np.asarray(x, np.float64) for x in jax.device_get(out))


def domain_losses(scorer: Scorer, batches, num_domains: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """`(loss_sum [D], tokens [D])` summed over `batches` by each row's domain; `kwargs` go to `row_losses`.

    `memory_index` may be an int: every row uses that domain's memory (memory swap).
    """
    loss, tokens = np.zeros(num_domains), np.zeros(num_domains)
    swap = kwargs.pop("memory_index", None)
    for batch in batches:
        index = None if swap is None else np.full(len(batch["domain"]), swap, np.int32)
        row_loss, row_tokens = scorer.row_losses(batch, memory_index=index, **kwargs)
        np.add.at(loss, batch["domain"], row_loss)
        np.add.at(tokens, batch["domain"], row_tokens)
    return loss, tokens
