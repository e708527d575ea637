"""Corpus statistics per domain and split: documents, paragraphs, characters and (given a tokenizer) tokens."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from sparsemem.data.packing import TokenizerLike
from sparsemem.data.sources import DomainSource, read_all

_TOKENIZE_CHUNK = 1024


@dataclasses.dataclass(frozen=True)
class SplitStats:
    domain: str
    split: str
    documents: int
    paragraphs: int
    characters: int
    tokens: int | None


def split_stats(source: DomainSource, split: str, *, document_key: str | None,
                tokenizer: TokenizerLike | None) -> SplitStats:
    """Counts for one domain and split; documents are distinct `document_key` values (records if None)."""
    records = read_all(source.records, f"{source.name}/{split}")
    texts = [source.text(record) for record in records]
    documents = len({record[document_key] for record in records}) if document_key else len(records)
    tokens = None
    if tokenizer is not None:
        tokens = sum(len(ids) for start in range(0, len(texts), _TOKENIZE_CHUNK)
                     for ids in tokenizer.encode_batch(texts[start:start + _TOKENIZE_CHUNK], add_bos=False))
    return SplitStats(source.name, split, documents, len(records), sum(map(len, texts)), tokens)


def format_table(rows: Sequence[SplitStats], *, document_label: str = "documents") -> str:
    """A Markdown table of `rows`."""
    header = ["domain", "split", document_label, "paragraphs", "characters", "tokens"]
    lines = [header]
    for row in rows:
        lines.append([row.domain, row.split, f"{row.documents:,}", f"{row.paragraphs:,}", f"{row.characters:,}",
                      "-" if row.tokens is None else f"{row.tokens:,}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    rendered = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(line, widths)) + " |" for line in lines]
    rendered.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(rendered)
