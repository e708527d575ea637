"""Per-target and per-row token losses of a frozen sharded backbone under a mask and a memory table."""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from sparsemem.evaluation.documents import DocumentBatches, DocumentLosses, accumulate
from sparsemem.koff import gates as gates_lib
from sparsemem.koff.memory import hooks_from_rows
from sparsemem.models.hooks import Hooks
from sparsemem.models.loss import token_cross_entropy
from sparsemem.train.sharded_backbone import ShardedBackbone


class Scorer:
    """Scores batches (`sparsemem.data` format) with `backbone` (e.g. a `KoffTrainer`'s).

    `masks` are 0/1 gate masks (`head`, `neuron`, ...) or None (dense); `memory` is a
    memory table `{name: [D, ...]}` (possibly a subset of its arrays) or None, and
    `memory_index [B]` picks each row's memory (default: the row's own domain, one of
    `num_domains`). Losses are computed in chunks of `loss_chunk` tokens.
    """

    def __init__(self, backbone: ShardedBackbone, *, loss_chunk: int, num_domains: int):
        self.backbone, self.loss_chunk, self.num_domains = backbone, loss_chunk, num_domains
        self._fn = jax.jit(self._row_losses, static_argnums=(5,))

    @classmethod
    def for_trainer(cls, trainer) -> "Scorer":
        """A scorer over a `KoffTrainer`'s backbone, loss chunk and memory table size."""
        return cls(trainer.backbone, loss_chunk=trainer.kcfg.loss_chunk, num_domains=trainer.kcfg.num_domains)

    def _row_losses(self, params, scales, table, index, batch, lora_scale):
        decoder = self.backbone.decoder(params)
        memory = hooks_from_rows(table, index, lora_scale, decoder.dtype) if table else Hooks()
        head, neuron = scales if scales is not None else (None, None)
        hooks = Hooks(head_scale=head, neuron_scale=neuron, memory_k=memory.memory_k, memory_v=memory.memory_v,
                      lora=memory.lora)
        hidden, _ = decoder(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                            hooks=hooks)
        ce = token_cross_entropy(decoder, hidden, batch["targets"], chunk_size=self.loss_chunk)
        return ce * batch["loss_mask"]

    def token_losses(self, batch: Mapping[str, np.ndarray], masks: Mapping[str, jax.Array] | None = None,
                     memory: Mapping[str, jax.Array] | None = None, memory_index: np.ndarray | None = None,
                     lora_scale: float = 1.0) -> np.ndarray:
        """`[B, T]` per-target losses in nats, 0 outside the loss mask.

        Every process passes the same whole `batch` (evaluation data is not sharded by process)
        and gets all of it back: each places its own block of rows, the result is gathered.
        """
        placed = self.backbone.place_batch(_process_rows(batch), self.num_domains)
        index = placed["domain"] if memory_index is None else np.asarray(memory_index, np.int32)
        scales = gates_lib.scales(dict(masks)) if masks is not None else None
        with self.backbone.context():
            out = self._fn(self.backbone.params, scales, dict(memory) if memory else {}, index, placed,
                           float(lora_scale))
        return np.asarray(multihost_utils.process_allgather(out, tiled=True), np.float64)

    def row_losses(self, batch: Mapping[str, np.ndarray], **kwargs) -> tuple[np.ndarray, np.ndarray]:
        """`(loss_sum [B], tokens [B])` in nats over each row's loss mask; `kwargs` as for `token_losses`."""
        return self.token_losses(batch, **kwargs).sum(axis=1), np.asarray(batch["loss_mask"], np.float64).sum(axis=1)


def _process_rows(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's block of rows of `batch`: `place_batch` stacks the blocks in process order."""
    count, index = jax.process_count(), jax.process_index()
    rows = len(batch["domain"])
    if rows % count:
        raise ValueError(f"an evaluation batch of {rows} rows cannot be split over {count} processes; "
                         f"set eval.batch_size to a multiple of {count}")
    block = rows // count
    return {key: value[index * block:(index + 1) * block] for key, value in batch.items()}


def document_losses(scorer: Scorer, documents: DocumentBatches, *, memory_index: int | None = None,
                    **kwargs) -> DocumentLosses:
    """Per-document losses of `documents` (`evaluation.documents`); `kwargs` go to `Scorer.token_losses`.

    `memory_index`: every row uses that domain's memory (memory swap); default: its own.
    """
    values = []
    for batch in documents.batches:
        index = None if memory_index is None else np.full(len(batch["domain"]), memory_index, np.int32)
        values.append(scorer.token_losses(batch, memory_index=index, **kwargs))
    return accumulate(documents, values)
