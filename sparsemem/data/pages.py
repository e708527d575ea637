"""Whole help pages as documents: a page's paragraphs in reading order, joined as the page reads.

The help corpus stores one paragraph per record (the aligned view needs that). Help
paragraphs average ~15 tokens, so as documents the token after BOS and the EOS are 2 of
every ~16 targets and the model mostly learns the paragraph format (DESIGN.md §4: dense
perplexity 167 per paragraph vs 15 per page). Training and perplexity therefore read
whole pages; the paragraph-aligned view stays for the memory-swap matrix and translation.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from sparsemem.data.sources import DomainSource, read_all

PARAGRAPH_SEPARATOR = "\n\n"  # a blank line between paragraphs, as the page renders them


def page_records(records: Sequence[Mapping], desc: str = "") -> list[dict[str, str]]:
    """One `{"text", "page_id"}` record per page of paragraph `records` (`page_id`, `position`, `text`).

    Pages come in order of page id; a page's paragraphs in order of `position`.
    """
    pages: dict[str, list[tuple[int, str]]] = {}
    for record in read_all(records, f"pages ({desc})"):
        if "position" not in record:
            raise ValueError("paragraph records lack 'position' (a corpus built before libreoffice_help 1.2.0); "
                             "rebuild it: `sparsemem data prepare` or delete the cached libreoffice_help folder")
        page = _text(record["page_id"])
        pages.setdefault(page, []).append((int(record["position"]), _text(record["text"])))
    return [{"page_id": page, "text": PARAGRAPH_SEPARATOR.join(text for _, text in sorted(paragraphs))}
            for page, paragraphs in sorted(pages.items())]


def page_source(paragraphs: DomainSource) -> DomainSource:
    """The same domain with one document per page instead of one per paragraph."""
    return DomainSource(paragraphs.name, page_records(paragraphs.records, paragraphs.name))


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
