"""Read the paragraphs of one LibreOffice help page (`.xhp` source XML or the `.html` Debian ships).

Both formats carry the same paragraph ids in every language, which is what makes the
corpus paragraph-aligned. Only the page's own paragraphs are returned: content
embedded from other pages, "how to get" navigation boxes, related-topic lists and
platform-specific variants other than the default are skipped here; deciding which
of the remaining paragraphs are natural language is `paragraph_filters`' job.
"""

from __future__ import annotations

import dataclasses
import html.parser
import re
import xml.etree.ElementTree as ET
from pathlib import Path

_WHITESPACE = re.compile(r"\s+")
_HTML_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"})
_HTML_SKIPPED_CLASSES = frozenset({"embedded", "howtoget", "relatedtopics", "bascode", "pycode", "sqlcode",
                                   "noteicon", "iconcell", "debug"})
_HTML_SKIPPED_TAGS = frozenset({"script", "style", "header", "aside", "nav", "code", "pre"})
_XHP_SKIPPED_TAGS = frozenset({"bascode", "pycode", "embed", "embedvar", "comment", "image", "caseinline", "case",
                               "bookmark", "bookmark_value", "sort", "meta"})
_XHP_SKIPPED_SECTIONS = frozenset({"howtoget", "relatedtopics", "related"})


@dataclasses.dataclass(frozen=True)
class HelpParagraph:
    """One paragraph of a help page: its id (shared across languages), role and plain text."""

    paragraph_id: str
    role: str
    text: str


def normalize_role(role: str) -> str:
    """Map HTML classes and xhp roles to one vocabulary (`tablecontentintable` -> `tablecontent`)."""
    role = role.strip().replace(" ", "")
    if role.endswith("intable") and role != "intable":
        role = role[: -len("intable")]
    return role or "paragraph"


def _clean(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


class _HtmlParagraphs(html.parser.HTMLParser):
    """Collects `<p id=...>` and `<hN id=...>` outside skipped regions."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[HelpParagraph] = []
        self._stack: list[tuple[str, bool]] = []  # (tag, starts a skipped region)
        self._skip_depth = 0
        self._current: tuple[str, str, list[str], int] | None = None  # id, role, parts, stack depth

    def handle_starttag(self, tag, attrs):
        if tag in _HTML_VOID:
            if tag == "br" and self._current is not None:
                self._current[2].append(" ")
            return
        attrs = dict(attrs)
        classes = set((attrs.get("class") or "").split())
        hidden_variant = "hidden" in attrs and not (attrs.get("id") or "").startswith("default")
        skipped = tag in _HTML_SKIPPED_TAGS or bool(classes & _HTML_SKIPPED_CLASSES) or hidden_variant
        self._stack.append((tag, skipped))
        self._skip_depth += skipped
        is_paragraph = tag == "p" or re.fullmatch(r"h[1-6]", tag) is not None
        if is_paragraph and self._current is None and not self._skip_depth and attrs.get("id"):
            role = "heading" if tag != "p" else normalize_role(attrs.get("class") or "")
            self._current = (attrs["id"], role, [], len(self._stack))

    def handle_endtag(self, tag):
        if tag in _HTML_VOID or not any(open_tag == tag for open_tag, _ in self._stack):
            return
        while self._stack:
            open_tag, skipped = self._stack.pop()
            self._skip_depth -= skipped
            if self._current is not None and len(self._stack) < self._current[3]:
                paragraph_id, role, parts, _ = self._current
                self.paragraphs.append(HelpParagraph(paragraph_id, role, _clean("".join(parts))))
                self._current = None
            if open_tag == tag:
                break

    def handle_data(self, data):
        if self._current is not None and not self._skip_depth:
            self._current[2].append(data)


def parse_html(source: str) -> list[HelpParagraph]:
    """Paragraphs of a help page rendered to HTML (the format of the Debian packages)."""
    parser = _HtmlParagraphs()
    parser.feed(source)
    parser.close()
    return parser.paragraphs


def _xhp_text(element: ET.Element) -> str:
    parts = [element.text or ""]
    for child in element:
        if child.tag == "br":
            parts.append(" ")
        elif child.tag not in _XHP_SKIPPED_TAGS:
            parts.append(_xhp_text(child))
        parts.append(child.tail or "")
    return "".join(parts)


def _xhp_paragraphs(element: ET.Element, out: list[HelpParagraph]) -> None:
    for child in element:
        if child.tag in _XHP_SKIPPED_TAGS or (child.tag == "section" and child.get("id") in _XHP_SKIPPED_SECTIONS):
            continue
        if child.tag == "paragraph":
            if child.get("id"):
                out.append(HelpParagraph(child.get("id"), normalize_role(child.get("role") or ""),
                                         _clean(_xhp_text(child))))
        else:
            _xhp_paragraphs(child, out)


def parse_xhp(source: str | bytes) -> list[HelpParagraph]:
    """Paragraphs of a help page in LibreOffice's `.xhp` source XML."""
    root = ET.fromstring(source)
    body = root.find("body")
    out: list[HelpParagraph] = []
    _xhp_paragraphs(body if body is not None else root, out)
    return out


def parse_page(path: Path) -> list[HelpParagraph]:
    """Paragraphs of the help page at `path`, by extension (`.xhp` or `.html`)."""
    if path.suffix == ".xhp":
        return parse_xhp(path.read_bytes())
    if path.suffix == ".html":
        return parse_html(path.read_text(encoding="utf-8", errors="replace"))
    raise ValueError(f"{path} is not a help page; expected a .xhp or .html file")


def page_files(tree: Path) -> dict[str, Path]:
    """Help pages under a language's help directory, keyed by page id (`text/swriter/main0202`).

    The page id is the path below the language directory without extension, hence the
    same for every language.
    """
    pages = {}
    for path in sorted(tree.rglob("*")):
        if path.suffix in (".xhp", ".html") and path.is_file():
            relative = path.relative_to(tree)
            if relative.parts[0] == "text":
                pages[relative.with_suffix("").as_posix()] = path
    return pages
