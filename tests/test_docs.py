"""The docs date results by commit and date, never by a numbered round of development."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "launch").rglob("*.md")])

# "round 3", "Session 7", "sessions 1-2", "session-2 tables", "turn 4", "sprint 2"; not a flag such as `--rounds 3`.
ROUND_NUMBER = re.compile(r"(?<![-\w])(?:round|session|turn|sprint)s?[ -]\d+", re.IGNORECASE)


@pytest.mark.parametrize("text, dated", [
    ("measured in session 7", True), ("### Sweep (Round 3)", True), ("chosen in sessions 1-2", True),
    ("(session-2 tables below)", True), ("on turn 4", True),
    ("`--rounds 3 --repeats 1`", False), ("in interleaved rounds", False), ("at e2d3729, 2026-12-03", False),
    ("probe run in the same session", False),
])
def test_the_pattern_catches_round_numbers_and_only_them(text, dated):
    assert bool(ROUND_NUMBER.search(text)) == dated


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_doc_dates_a_result_by_a_round_number(path):
    hits = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1)
            if ROUND_NUMBER.search(line)]
    assert not hits, "date these by commit and date (git log), not by round:\n" + "\n".join(hits)
