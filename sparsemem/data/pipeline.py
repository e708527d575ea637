"""grain input pipelines: endless mixed training batches and a finite evaluation pass.

Per domain: this process's shard of the records -> (shuffle, repeat) -> tokenise ->
examples -> first-fit packing into rows of one domain. Training mixes the domains'
row streams with fixed proportions (deterministic for a seed) and batches them; the
returned iterator's `get_state()`/`set_state()` resume exactly at the next batch.
Evaluation concatenates the domains unshuffled and visits every record once.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import grain
import numpy as np

from sparsemem.data.packing import FormatRow, LongDocuments, ToExamples, TokenizeDocument, TokenizerLike, pack
from sparsemem.data.sources import DomainSource

# Records are tokenised by a few threads ahead of packing (tokenizers' Rust code releases the GIL).
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's slice of every domain: records `index, index + count, ...`."""

    index: int
    count: int

    @classmethod
    def of_jax_process(cls) -> "Shard":
        import jax

        return cls(jax.process_index(), jax.process_count())

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"Shard index {self.index} must be in [0, {self.count})")


def mixture_weights(sources: Sequence[DomainSource], mixture: Mapping[str, float] | float | None) -> list[float]:
    """Sampling weight per domain.

    `None`: uniform. A mapping: explicit weights by domain name (every domain, positive).
    A number `tau`: temperature sampling, weight proportional to (number of documents)^(1/tau),
    so 1 follows the data and larger values flatten towards uniform.
    """
    names = [source.name for source in sources]
    if mixture is None:
        return [1.0] * len(sources)
    if isinstance(mixture, Mapping):
        if set(mixture) != set(names) or min(mixture.values()) <= 0:
            raise ValueError(f"Mixture weights {dict(mixture)} must give a positive weight to exactly the domains "
                             f"{names}")
        return [float(mixture[name]) for name in names]
    if mixture <= 0:
        raise ValueError(f"Mixture temperature must be positive, got {mixture}")
    sizes = np.array([len(source.records) for source in sources], dtype=np.float64)
    weights = sizes ** (1.0 / mixture)
    return list(weights / weights.sum())


def _domain_seed(seed: int, domain: int) -> int:
    return (seed * 1_000_003 + domain) % 2**32


def _domain_rows(source: DomainSource, domain: int, tokenizer: TokenizerLike, *, seq_len: int, seed: int,
                 shard: Shard, train: bool, packing_bins: int, long_documents: LongDocuments | str
                 ) -> grain.IterDataset:
    records = grain.MapDataset.source(source.records)[shard.index::shard.count]
    if len(records) == 0:
        raise ValueError(f"Domain {source.name!r} has {len(source.records)} documents, too few to give each of "
                         f"{shard.count} processes one; use a larger corpus or fewer processes")
    if train:
        records = records.shuffle(seed=_domain_seed(seed, domain)).repeat()
    documents = records.map(TokenizeDocument(tokenizer, source.text)).to_iter_dataset(_READ_OPTIONS)
    examples = grain.experimental.FlatMapIterDataset(documents, ToExamples(seq_len, long_documents))
    rows = pack(examples, seq_len=seq_len, pad_id=tokenizer.pad_id, num_bins=packing_bins,
                seed=_domain_seed(seed, domain), shuffle_bins=train)
    return rows.map(FormatRow(domain))


def train_batches(sources: Sequence[DomainSource], tokenizer: TokenizerLike, *, seq_len: int, batch_size: int,
                  mixture: Mapping[str, float] | float | None = None, seed: int = 0, shard: Shard | None = None,
                  packing_bins: int | None = None,
                  long_documents: LongDocuments | str = LongDocuments.SPLIT) -> grain.DatasetIterator:
    """Endless training batches of `batch_size` packed rows (per process) from `sources`.

    Each row holds documents of one domain; `domain` is the source's index in `sources`.
    Domains are mixed by `mixture` (see `mixture_weights`; proportions of rows, hence
    roughly of tokens). Deterministic for `seed`; `shard` defaults to this JAX process.
    Save `iterator.get_state()` with the checkpoint and `set_state()` it on resume.
    """
    if not sources:
        raise ValueError("No domains given; pass at least one DomainSource")
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"seq_len must be >= 2 and batch_size >= 1, got {seq_len} and {batch_size}")
    weights = mixture_weights(sources, mixture)
    shard = shard or Shard.of_jax_process()
    rows = [_domain_rows(source, domain, tokenizer, seq_len=seq_len, seed=seed, shard=shard, train=True,
                         packing_bins=packing_bins or batch_size, long_documents=long_documents)
            for domain, source in enumerate(sources)]
    mixed = grain.IterDataset.mix(rows, weights) if len(rows) > 1 else rows[0]
    return iter(mixed.batch(batch_size, drop_remainder=True))


class _PadBatch(grain.transforms.Map):
    """Pad the final short batch with empty rows (segment 0, loss mask 0) to a fixed `[B, T]` shape."""

    def __init__(self, batch_size: int, pad_id: int):
        self._batch_size, self._pad_id = batch_size, pad_id

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = self._batch_size - len(batch["domain"])
        if missing == 0:
            return batch
        fill = {"inputs": self._pad_id, "targets": self._pad_id}
        return {key: np.concatenate([value, np.full((missing, *value.shape[1:]), fill.get(key, 0), value.dtype)])
                for key, value in batch.items()}


def eval_batches(sources: Sequence[DomainSource], tokenizer: TokenizerLike, *, seq_len: int, batch_size: int,
                 shard: Shard | None = None, long_documents: LongDocuments | str = LongDocuments.SPLIT
                 ) -> grain.IterDataset:
    """One unshuffled pass over every record of `sources` (this process's shard), domain by domain.

    Rows are packed in order; the last batch is padded with empty rows (loss mask 0) so
    every batch is `[batch_size, seq_len]`. Iterate it again for another identical pass.
    """
    if not sources:
        raise ValueError("No domains given; pass at least one DomainSource")
    shard = shard or Shard.of_jax_process()
    rows = [_domain_rows(source, domain, tokenizer, seq_len=seq_len, seed=0, shard=shard, train=False,
                         packing_bins=batch_size, long_documents=long_documents)
            for domain, source in enumerate(sources)]
    concatenated = grain.experimental.InterleaveIterDataset(rows, cycle_length=1)
    return concatenated.batch(batch_size, drop_remainder=False).map(_PadBatch(batch_size, tokenizer.pad_id))

