"""Per-target and per-row token losses of a frozen sharded backbone under a mask and a memory table.

Evaluation runs many settings (masks x memory tables) over the same rows, so it is built
to compile as little as possible: a mask is data (all ones for the dense model), a
memory table always has every array of the run's table (the LoRA arrays a setting leaves
out are zeros: an exactly-zero delta), and every input is placed with the same sharding.
So all settings share one compiled program per row shape, or two when some use KV memory
and some do not (absent KV slots cannot be zeros: a zero key still takes attention). The
program is jitted at module level with the decoder's definition as a static argument,
so every `Scorer` over an equal backbone (another variant's trainer, another seed)
reuses it too. Batches are pipelined: the next one is placed and dispatched before the
previous one's losses are fetched.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from sparsemem.evaluation.documents import DocumentBatches, DocumentLosses, accumulate
from sparsemem.koff import gates as gates_lib
from sparsemem.koff.memory import hooks_from_rows
from sparsemem.models.hooks import Hooks
from sparsemem.models.loss import token_cross_entropy
from sparsemem.train.sharded_backbone import ShardedBackbone


@functools.partial(jax.jit, static_argnames=("decoder_def", "loss_chunk", "lora_scale", "rules"))
def _token_losses(params, scales, table, index, batch, *, decoder_def, loss_chunk: int, lora_scale: float, rules):
    """`[B, T]` losses under `scales = (head [L, H], neuron [L, F])` and memory rows `table[name][index]`.

    `rules` only keys the cache: the caller traces under its backbone's rules (`ShardedBackbone.context`).
    """
    del rules
    decoder = nnx.merge(decoder_def, params)
    memory = hooks_from_rows(table, index, lora_scale, decoder.dtype) if table else Hooks()
    hooks = Hooks(head_scale=scales[0], neuron_scale=scales[1], memory_k=memory.memory_k, memory_v=memory.memory_v,
                  lora=memory.lora)
    hidden, _ = decoder(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"], hooks=hooks)
    return token_cross_entropy(decoder, hidden, batch["targets"], chunk_size=loss_chunk) * batch["loss_mask"]


@dataclasses.dataclass(frozen=True)
class PlacedSetting:
    """A mask and a memory table as the compiled program takes them (`Scorer.setting`): placed, complete."""

    scales: tuple[jax.Array, jax.Array]
    table: dict[str, jax.Array]
    lora_scale: float


class Scorer:
    """Scores batches (`sparsemem.data` format) with `backbone` (e.g. a `KoffTrainer`'s).

    `memory_shapes` are the arrays of the run's memory table (`{name: ShapeDtypeStruct}` with
    shardings, e.g. a trainer's `abstract_state.memory`; empty: no table); `lora_scale` the
    run's LoRA multiplier. `memory_index [B]` picks each row's memory (default: the row's
    own domain, one of `num_domains`). Losses are computed in chunks of `loss_chunk` tokens.
    """

    def __init__(self, backbone: ShardedBackbone, *, loss_chunk: int, num_domains: int,
                 memory_shapes: Mapping[str, jax.ShapeDtypeStruct] | None = None, lora_scale: float = 1.0):
        self.backbone, self.loss_chunk, self.num_domains = backbone, loss_chunk, num_domains
        self.memory_shapes, self.lora_scale = dict(memory_shapes or {}), float(lora_scale)

    # Placed on first use, so a scorer over a compile-only mesh (`trace`) never touches a device.
    @functools.cached_property
    def _dense(self) -> tuple[jax.Array, jax.Array]:
        return self._place_scales(tuple(np.ones(shape, np.float32) for shape in self._scale_shapes))

    @functools.cached_property
    def _zeros(self) -> dict[str, jax.Array]:
        return {name: jax.device_put(np.zeros(s.shape, s.dtype), getattr(s, "sharding", None))
                for name, s in self.memory_shapes.items() if name not in ("k", "v")}

    @property
    def _scale_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        cfg = self.backbone.cfg
        return (cfg.num_layers, cfg.num_heads), (cfg.num_layers, cfg.d_ff)

    @classmethod
    def for_trainer(cls, trainer) -> "Scorer":
        """A scorer over a `KoffTrainer`'s backbone, loss chunk, memory table and LoRA scale."""
        k = trainer.kcfg
        return cls(trainer.backbone, loss_chunk=k.loss_chunk, num_domains=k.num_domains,
                   memory_shapes=trainer.abstract_state.memory, lora_scale=k.lora_scale)

    def _place_scales(self, scales) -> tuple[jax.Array, jax.Array]:
        return tuple(jax.device_put(jnp.asarray(x, jnp.float32), self.backbone.replicated) for x in scales)

    def setting(self, masks: Mapping[str, jax.Array] | None = None, memory: Mapping[str, jax.Array] | None = None,
                lora_scale: float | None = None) -> PlacedSetting:
        """`masks` (0/1 or gate values: `head`, `neuron`, ...; None: dense) and `memory` (arrays of the
        table, possibly a subset; None: none) as the program takes them. `lora_scale`: the run's by default."""
        memory = dict(memory or {})
        unknown = sorted(set(memory) - set(self.memory_shapes))
        if unknown:
            raise ValueError(f"memory arrays {unknown} are not in this scorer's table {sorted(self.memory_shapes)}; "
                             "build the Scorer from the trainer that made the table (Scorer.for_trainer)")
        for name, x in memory.items():
            if tuple(x.shape) != tuple(self.memory_shapes[name].shape):
                raise ValueError(f"memory[{name!r}] has shape {tuple(x.shape)}, the table's is "
                                 f"{tuple(self.memory_shapes[name].shape)}")
        has_lora = any(name not in ("k", "v") for name in memory)
        table = {**self._zeros, **{name: jax.device_put(x, getattr(self.memory_shapes[name], "sharding", None))
                                   for name, x in memory.items()}}
        scales = self._dense if masks is None else self._place_scales(gates_lib.scales(dict(masks)))
        scale = self.lora_scale if lora_scale is None or not has_lora else float(lora_scale)
        return PlacedSetting(scales, table, scale)

    def dispatch(self, batch: Mapping[str, np.ndarray], setting: PlacedSetting,
                 memory_index: np.ndarray | None = None) -> jax.Array:
        """Start scoring `batch` under `setting`; `fetch` the result. Does not wait for the device."""
        if memory_index is not None:
            batch = {**batch, "domain": np.asarray(memory_index, np.int32)}
        placed = self.backbone.place_batch(_process_rows(batch), self.num_domains)
        with self.backbone.context():
            return _token_losses(self.backbone.params, setting.scales, setting.table, placed["domain"], placed,
                                 decoder_def=self.backbone.decoder_def, loss_chunk=self.loss_chunk,
                                 lora_scale=setting.lora_scale, rules=self.backbone.rules)

    def trace(self, rows: int, seq_len: int) -> jax.stages.Traced:
        """The program every setting runs, traced for global batches of `rows` x `seq_len` targets with the
        shapes, dtypes and shardings `dispatch` passes it (the KV-memory program when the table has KV):
        what `sparsemem compile` lowers, under `backbone.context()`. Needs no arrays, only their shapes."""
        batch = self.backbone.abstract_batch(rows, seq_len)
        scales = tuple(jax.ShapeDtypeStruct(shape, jnp.float32, sharding=self.backbone.replicated)
                       for shape in self._scale_shapes)
        return _token_losses.trace(self.backbone.params, scales, self.memory_shapes, batch["domain"], batch,
                                   decoder_def=self.backbone.decoder_def, loss_chunk=self.loss_chunk,
                                   lora_scale=self.lora_scale, rules=self.backbone.rules)

    @staticmethod
    def fetch(losses: jax.Array) -> np.ndarray:
        """The whole `[B, T]` losses of a `dispatch` on every process (each placed its own rows)."""
        return np.asarray(multihost_utils.process_allgather(losses, tiled=True), np.float64)

    def token_losses(self, batch: Mapping[str, np.ndarray], masks: Mapping[str, jax.Array] | None = None,
                     memory: Mapping[str, jax.Array] | None = None, memory_index: np.ndarray | None = None,
                     lora_scale: float | None = None) -> np.ndarray:
        """`[B, T]` per-target losses in nats, 0 outside the loss mask (`setting` explains the arguments).

        Every process passes the same whole `batch` (evaluation data is not sharded by process)
        and gets all of it back: each places its own block of rows, the result is gathered.
        """
        return self.fetch(self.dispatch(batch, self.setting(masks, memory, lora_scale), memory_index))

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
    """Per-document losses of `documents` (`evaluation.documents`); `kwargs` go to `Scorer.setting`.

    `memory_index`: every row uses that domain's memory (memory swap); default: its own.
    Batch `i + 1` is dispatched before batch `i` is fetched, so host work overlaps the device's.
    """
    setting = scorer.setting(**kwargs)
    values, pending = [], None
    for batch in documents.batches:
        index = None if memory_index is None else np.full(len(batch["domain"]), memory_index, np.int32)
        running = scorer.dispatch(batch, setting, index)
        if pending is not None:
            values.append(scorer.fetch(pending))
        pending = running
    if pending is not None:
        values.append(scorer.fetch(pending))
    return accumulate(documents, values)
