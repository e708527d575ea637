"""Evaluation rows that remember which document every target belongs to.

Training packs with grain (`sparsemem.data.pipeline`); evaluation needs more than a
per-domain sum: per-document losses (bootstrap intervals over documents), the loss
by position in the document, and the loss without the first target after BOS. So
evaluation rows are built here, deterministically: a document is `[bos] + ids + [eos]`;
one that does not fit in one row of `seq_len` targets is scored in windows, each later
window starting with BOS and the `context` tokens before its first scored target
(targets there are not scored), so every target is scored once and, past the first
window, still sees at least `context` tokens of its document. Pieces are packed into
rows of one domain, longest first into the row it fills best (best-fit decreasing: a
padded slot costs a scored one's compute), each its own segment with positions from
`first_position`. Two extra keys travel with each batch: `document [B, T]` (index into
the documents, -1 for padding and unscored context) and `offset [B, T]` (the target's
index in its document: 0 is the first token after BOS).
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass
class DocumentBatches:
    batches: list[dict[str, np.ndarray]]
    domain: np.ndarray  # [N] domain of each document
    tokens: np.ndarray  # [N] targets per document

    def __len__(self) -> int:
        return len(self.domain)


def _new_batch(batch_size: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    b, t = batch_size, seq_len
    return {"inputs": np.full((b, t), pad_id, np.int32), "targets": np.full((b, t), pad_id, np.int32),
            "loss_mask": np.zeros((b, t), np.float32), "segment_ids": np.zeros((b, t), np.int32),
            "positions": np.zeros((b, t), np.int32), "domain": np.zeros((b,), np.int32),
            "document": np.full((b, t), -1, np.int32), "offset": np.full((b, t), -1, np.int32)}


def _windows(tokens: np.ndarray, seq_len: int, context: int) -> list[tuple[np.ndarray, int, int]]:
    """`(ids, unscored, start)` per window of one `[bos, ..., eos]` document.

    `ids[:-1]` are a row's inputs and `ids[1:]` its targets; the first `unscored` targets
    are context; the scored ones are the document's targets `start, start + 1, ...`.
    """
    windows, start = [(tokens[:seq_len + 1], 0, 0)], seq_len
    while start < len(tokens) - 1:
        end = min(start + seq_len - context - 1, len(tokens) - 1)
        windows.append((np.concatenate([tokens[:1], tokens[start - context:end + 1]]), context + 1, start))
        start = end
    return windows


def _best_fit_decreasing(pieces: list[tuple[int, np.ndarray, int, int]], seq_len: int) -> list[list]:
    """`pieces` (`piece[1]` holds its inputs and targets) in rows of `seq_len` targets: longest first, each
    into the row it fills best (least room left; ties: the earliest row), so the rows are deterministic.
    O(pieces x log rows): every test page of a large corpus packs in seconds."""
    rows, rooms = [], []  # rooms: sorted (room left, row) of the rows with room
    for piece in sorted(pieces, key=lambda p: -len(p[1])):
        n = len(piece[1]) - 1
        i = bisect.bisect_left(rooms, (n, -1))
        if i == len(rooms):
            rows.append([])
            room, row = seq_len, len(rows) - 1
        else:
            room, row = rooms.pop(i)
        rows[row].append(piece)
        if room > n:
            bisect.insort(rooms, (room - n, row))
    return rows


def document_batches(token_ids: Sequence[Sequence[Sequence[int]]], *, eos_id: int, pad_id: int, seq_len: int,
                     batch_size: int, context: int = 0, first_position: int = 0) -> DocumentBatches:
    """Rows of `token_ids[domain][document]` (each with BOS, without EOS) in fixed `[batch_size, seq_len]` batches.

    Documents are numbered domain by domain in order. A document longer than a row is
    scored in windows carrying `context` earlier tokens (module docstring). The last
    batch is padded with empty rows (loss mask 0).
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
    if not 0 <= context <= seq_len - 2:
        raise ValueError(f"context={context} must be in [0, seq_len - 2 = {seq_len - 2}]: a window holds BOS, the "
                         "context and at least one scored target")
    rows: list[tuple[int, list[tuple[int, np.ndarray, int, int]]]] = []  # (domain, [(document, ids, unscored, start)])
    domains, lengths = [], []
    for domain, documents in enumerate(token_ids):
        pieces = []
        for ids in documents:
            tokens = np.asarray([*ids, eos_id], np.int32)
            if len(tokens) < 2:
                raise ValueError(f"a document of domain {domain} has no tokens; drop empty documents first")
            pieces += [(len(domains), *window) for window in _windows(tokens, seq_len, context)]
            domains.append(domain)
            lengths.append(len(tokens) - 1)
        rows += [(domain, row) for row in _best_fit_decreasing(pieces, seq_len)]
    batches = []
    for first in range(0, len(rows), batch_size):
        batch = _new_batch(batch_size, seq_len, pad_id)
        for r, (domain, pieces) in enumerate(rows[first:first + batch_size]):
            batch["domain"][r] = domain
            col = 0
            for segment, (document, piece, unscored, start) in enumerate(pieces, start=1):
                n = len(piece) - 1
                span, scored = slice(col, col + n), slice(col + unscored, col + n)
                batch["inputs"][r, span], batch["targets"][r, span] = piece[:-1], piece[1:]
                batch["segment_ids"][r, span] = segment
                batch["positions"][r, span] = first_position + np.arange(n)
                batch["loss_mask"][r, scored] = 1.0
                batch["document"][r, scored] = document
                batch["offset"][r, scored] = start + np.arange(n - unscored)
                col += n
        batches.append(batch)
    return DocumentBatches(batches, np.asarray(domains, np.int32), np.asarray(lengths, np.float64))


@dataclasses.dataclass
class DocumentLosses:
    """Per-document loss sums (nats) of one setting, plus the loss by offset in the document."""

    loss: np.ndarray  # [N] summed over every target
    first: np.ndarray  # [N] the loss of the first target after BOS
    by_offset: np.ndarray  # [seq_len-ish] summed loss per offset bucket, over all documents
    count_by_offset: np.ndarray  # [same] targets per offset bucket

    def as_dict(self) -> dict:
        return {k: v.tolist() for k, v in dataclasses.asdict(self).items()}


def offset_buckets(offsets: np.ndarray) -> np.ndarray:
    """Bucket of each target offset: offsets 0..3 are their own bucket, then [2^k, 2^(k+1)) share one."""
    offsets = np.asarray(offsets)
    return np.where(offsets < 4, offsets, np.floor(np.log2(np.maximum(offsets, 1))).astype(int) + 2)


def bucket_edges(num_buckets: int) -> list[str]:
    """Labels of the offset buckets `0, 1, 2, 3, 4-7, 8-15, ...`; the last one holds every larger offset."""
    label = lambda b: str(b) if b < 4 else f"{2 ** (b - 2)}-{2 ** (b - 1) - 1}"  # noqa: E731
    return [label(b) for b in range(num_buckets - 1)] + [f">={num_buckets - 1 if num_buckets <= 4 else 2 ** (num_buckets - 3)}"]


def accumulate(batches: DocumentBatches, token_losses: Sequence[np.ndarray], num_buckets: int = 16) -> DocumentLosses:
    """`DocumentLosses` from each batch's `[B, T]` per-target losses (0 where the loss mask is 0)."""
    n = len(batches)
    loss, first = np.zeros(n), np.zeros(n)
    by_offset, count = np.zeros(num_buckets), np.zeros(num_buckets)
    for batch, values in zip(batches.batches, token_losses):
        real = batch["document"] >= 0
        docs, offs, vals = batch["document"][real], batch["offset"][real], np.asarray(values, np.float64)[real]
        np.add.at(loss, docs, vals)
        np.add.at(first, docs[offs == 0], vals[offs == 0])
        buckets = np.minimum(offset_buckets(offs), num_buckets - 1)
        np.add.at(by_offset, buckets, vals)
        np.add.at(count, buckets, 1.0)
    return DocumentLosses(loss, first, by_offset, count)
