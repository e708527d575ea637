"""Progress: a tqdm bar on a terminal, plain periodic log lines (no "\\r" frames) when the output is a file."""

import io
import logging

import tqdm

from sparsemem import progress as progress_lib


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_every_item_passes_and_the_log_gets_plain_lines(monkeypatch, caplog):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    with caplog.at_level(logging.INFO, logger="sparsemem.progress"):
        items = list(progress_lib.progress(range(7), "Reading pages", "chunks", every_s=0.0))
    assert items == list(range(7))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:7] == [f"Reading pages: {n}/7 chunks, 0 s" for n in range(1, 8)]
    assert lines[7].startswith("Reading pages: 7/7 chunks, done in ")
    assert not any("\r" in line for line in lines)


def test_off_a_terminal_a_loop_shorter_than_the_period_leaves_no_line(monkeypatch, caplog):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    with caplog.at_level(logging.INFO, logger="sparsemem.progress"):
        items = list(progress_lib.progress((i for i in range(5)), "Parsing", "pages", every_s=3600.0))
    assert items == list(range(5))
    assert caplog.records == []


def test_off_a_terminal_an_iterable_without_a_length_counts_without_a_total(monkeypatch, caplog):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    with caplog.at_level(logging.INFO, logger="sparsemem.progress"):
        list(progress_lib.progress((i for i in range(2)), "Parsing", "pages", every_s=0.0))
    assert [r.getMessage() for r in caplog.records][:2] == ["Parsing: 1 pages, 0 s", "Parsing: 2 pages, 0 s"]


def test_on_a_terminal_it_is_a_tqdm_bar(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    bar = progress_lib.progress([1, 2, 3], "Reading", "files")
    assert isinstance(bar, tqdm.tqdm)
    assert list(bar) == [1, 2, 3]
    assert "\rReading" in terminal.getvalue()
