"""Assign whole documents (help pages, files) to train/validation/test by a stable hash of their id.

The hash (sha256, not Python's salted `hash`) gives the same split on every machine
and in every language, so a page never leaks from training into evaluation.
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.9, 0.05, 0.05)


def split_of(document_id: str, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> str:
    """The split (`train`, `validation` or `test`) that `document_id` belongs to."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"Split fractions {fractions} must be three non-negative numbers summing to 1 "
                         "(train, validation, test)")
    digest = hashlib.sha256(document_id.encode("utf-8")).digest()
    unit = int.from_bytes(digest[:8], "big") / 2**64
    if unit < fractions[0]:
        return "train"
    return "validation" if unit < fractions[0] + fractions[1] else "test"


def check_all_splits_filled(counts: dict[str, int], corpus: str) -> None:
    """Raise if a split got no documents (TFDS cannot write an empty split), naming the fix."""
    empty = [name for name in SPLITS if not counts.get(name)]
    if empty:
        raise ValueError(f"{corpus} has no documents in split(s) {', '.join(empty)} ({sum(counts.values())} "
                         f"documents in all, split {DEFAULT_FRACTIONS} by a hash of their ids); add documents "
                         "(a few hundred make every split non-empty)")
