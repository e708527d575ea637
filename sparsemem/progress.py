"""Progress of long loops: a tqdm bar on a terminal, a plain log line every `every_s` seconds otherwise.

A bar redraws itself with "\\r", so in a log file it leaves hundreds of fragments on one
line; a run's log (`sparsemem run ... > log`) gets "Reading pages: 3000/9000 chunk, 10 s"
lines instead. TFDS builders draw bars of their own: `tfds_bars()` turns them off off a
terminal too.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

import tqdm

log = logging.getLogger(__name__)

T = TypeVar("T")
EVERY_S = 30.0


def on_terminal() -> bool:
    """Whether progress goes to a terminal (tqdm writes to stderr)."""
    return sys.stderr.isatty()


def progress(items: Iterable[T], desc: str, unit: str = "it", every_s: float = EVERY_S) -> Iterable[T]:
    """`items`, reporting how far the loop got: a tqdm bar on a terminal, else a log line every `every_s` s."""
    if on_terminal():
        return tqdm.tqdm(items, desc=desc, unit=unit, leave=False)
    return _log_lines(items, desc, unit, every_s)


def _log_lines(items: Iterable[T], desc: str, unit: str, every_s: float) -> Iterator[T]:
    total = f"/{len(items)}" if hasattr(items, "__len__") else ""
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_s:
            log.info("%s: %d%s %s, %.0f s", desc, done, total, unit, now - start)
            last = now
    if time.monotonic() - start >= every_s:  # a loop shorter than the period leaves no line
        log.info("%s: %d%s %s, done in %.1f s", desc, done, total, unit, time.monotonic() - start)


def tfds_bars() -> None:
    """Let TFDS draw its progress bars only on a terminal (call before `download_and_prepare`)."""
    import tensorflow_datasets as tfds  # noqa: PLC0415 (only the data builders need it)

    tfds.display_progress_bar(on_terminal())
