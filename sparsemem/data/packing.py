"""Documents -> next-token examples -> packed fixed-length rows.

A document becomes `[bos] + ids + [eos]`; its example is `inputs = tokens[:-1]`,
`targets = tokens[1:]`, so targets never cross into another document. Examples
longer than a row are handled by `LongDocuments` (split, truncate with a logged
count, or error). Rows are packed by grain's first-fit packer and formatted as the
batch interface: `inputs`, `targets`, `loss_mask`, `segment_ids` (1..n, 0 = padding),
`positions` (from 0 within each document) and `domain`.
"""

from __future__ import annotations

import enum
import logging
from typing import Any, Callable, Protocol, Sequence

import grain
import numpy as np

log = logging.getLogger(__name__)


class TokenizerLike(Protocol):
    bos_id: int | None
    eos_id: int
    pad_id: int

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = True) -> list[list[int]]: ...


class LongDocuments(str, enum.Enum):
    """What to do with a document whose example is longer than a row."""

    SPLIT = "split"  # consecutive pieces, each its own segment with positions from 0; no token is lost
    TRUNCATE = "truncate"  # keep the first row's worth; a warning counts the truncated documents
    ERROR = "error"  # raise, naming the document length and the fix


class TokenizeDocument(grain.transforms.Map):
    """Record -> `{"tokens": int32[n]}` with BOS (if the tokenizer has one) and EOS."""

    def __init__(self, tokenizer: TokenizerLike, text_of: Callable[[Any], str]):
        self._tokenizer, self._text_of = tokenizer, text_of

    def map(self, record: Any) -> dict[str, np.ndarray]:
        ids = self._tokenizer.encode_batch([self._text_of(record)], add_bos=True)[0]
        return {"tokens": np.asarray([*ids, self._tokenizer.eos_id], dtype=np.int32)}


class ToExamples(grain.experimental.FlatMapTransform):
    """Tokens -> one or more `{"inputs", "targets"}` examples of at most `seq_len` tokens.

    Meant for `grain.experimental.FlatMapIterDataset`, which puts no limit on the fan-out.
    """

    def __init__(self, seq_len: int, long_documents: LongDocuments | str = LongDocuments.SPLIT):
        self._seq_len = seq_len
        self._policy = LongDocuments(long_documents)
        self.truncated = 0

    def flat_map(self, element: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        tokens, n = element["tokens"], len(element["tokens"]) - 1
        if n > self._seq_len and self._policy is LongDocuments.ERROR:
            raise ValueError(f"A document has {n + 1} tokens, more than a row of seq_len={self._seq_len} holds; "
                             "raise seq_len or set long_documents to 'split' or 'truncate'")
        if n > self._seq_len and self._policy is LongDocuments.TRUNCATE:
            self.truncated += 1
            if self.truncated & (self.truncated - 1) == 0:  # 1, 2, 4, 8, ...: visible but not flooding
                log.warning("Truncated %d document(s) so far to seq_len=%d tokens (this one had %d)",
                            self.truncated, self._seq_len, n + 1)
            tokens, n = tokens[: self._seq_len + 1], self._seq_len
        pieces = [tokens[start:start + self._seq_len + 1] for start in range(0, n, self._seq_len)]
        return [{"inputs": piece[:-1], "targets": piece[1:]} for piece in pieces]


class FormatRow(grain.transforms.Map):
    """grain's packed row -> the batch interface, tagged with the domain index."""

    def __init__(self, domain: int):
        self._domain = np.int32(domain)

    def map(self, packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        segment_ids = packed["inputs_segment_ids"].astype(np.int32)
        return {
            "inputs": packed["inputs"].astype(np.int32),
            "targets": packed["targets"].astype(np.int32),
            "loss_mask": (segment_ids > 0).astype(np.float32),
            "segment_ids": segment_ids,
            "positions": packed["inputs_positions"].astype(np.int32),
            "domain": self._domain,
        }


def pack(examples: grain.IterDataset, *, seq_len: int, pad_id: int, num_bins: int, seed: int,
         shuffle_bins: bool) -> grain.IterDataset:
    """First-fit pack `{"inputs", "targets"}` examples into rows of `seq_len` (adds segment ids, positions)."""
    return grain.experimental.FirstFitPackIterDataset(
        examples, length_struct={"inputs": seq_len, "targets": seq_len}, num_packing_bins=num_bins, seed=seed,
        shuffle_bins=shuffle_bins, padding_struct={"inputs": pad_id, "targets": pad_id})
