"""Keep the natural-language paragraphs of a help page, and count every paragraph dropped and why.

Dropped: non-prose roles (code, formulas, table headers, images, navigation), text
with too few letters (numbers, formulas, paths; a CJK character counts as two
letters), repeated paragraph ids within a page (the first occurrence is kept), and in
languages other than English, paragraphs whose text equals the English one for the
same page and id (left untranslated).
"""

from __future__ import annotations

import collections
import unicodedata
from typing import Iterable, Mapping

from sparsemem.data.help_pages import HelpParagraph

REFERENCE_LANGUAGE = "en-US"
NATURAL_ROLES = frozenset({"paragraph", "heading", "tablecontent", "tablecontents", "table_font_smallparagraph",
                           "listitem", "ul_item", "ol_item", "ilistitem", "note", "tip", "warning"})
MIN_LETTERS = 3
MIN_LETTER_FRACTION = 0.5


def _letter_weight(ch: str) -> int:
    """Letters count 1, wide (CJK) letters 2: one such character carries about what a short word does."""
    if not ch.isalpha():
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def has_enough_letters(text: str) -> bool:
    """True for prose: at least `MIN_LETTERS` (weighted) letters, and letters are most of the visible text."""
    letters = sum(map(_letter_weight, text))
    others = sum(not ch.isspace() and not ch.isalpha() for ch in text)
    return letters >= MIN_LETTERS and letters >= MIN_LETTER_FRACTION * (letters + others)


def natural_paragraphs(paragraphs: Iterable[HelpParagraph], *, reference: Mapping[str, str] | None,
                       dropped: collections.Counter) -> list[HelpParagraph]:
    """The page's prose paragraphs, first occurrence per id; `dropped` counts the rest by reason.

    `reference` maps paragraph id -> English text of the same page; pass None for
    English itself (then nothing counts as untranslated).
    """
    kept, seen = [], set()
    for paragraph in paragraphs:
        if paragraph.paragraph_id in seen:
            dropped["duplicate id"] += 1
        elif paragraph.role not in NATURAL_ROLES:
            dropped[f"role {paragraph.role}"] += 1
        elif not has_enough_letters(paragraph.text):
            dropped["too few letters"] += 1
        elif reference is not None and reference.get(paragraph.paragraph_id) == paragraph.text:
            dropped["untranslated"] += 1
        else:
            kept.append(paragraph)
        seen.add(paragraph.paragraph_id)
    return kept
