"""Domains of text for the pipeline: a name plus random-access records holding a text field.

A `DomainSource` is what `pipeline.train_batches`/`eval_batches` consume; the domain
id of a row is the source's position in the list passed there. Constructors here
cover the LibreOffice help (per language, optionally the aligned view), user text
folders and TFDS catalogue datasets such as `wiki40b/de`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Mapping, Sequence

import tensorflow_datasets as tfds

from sparsemem.data import libreoffice_help, text_folder
from sparsemem.progress import progress

_READ_CHUNK = 4096
_WIKI40B_MARKERS = re.compile(r"\n?_START_(?:ARTICLE|SECTION|PARAGRAPH)_\n")


@dataclasses.dataclass(frozen=True)
class DomainSource:
    """One domain's documents: `records[i][text_key]` is the text (str or utf-8 bytes) of document i.

    `clean`, if given, turns the stored text into plain text (e.g. strips wiki40b's markers).
    """

    name: str
    records: Sequence[Mapping[str, Any]]
    text_key: str = "text"
    clean: Callable[[str], str] | None = None

    def __post_init__(self):
        if len(self.records) == 0:
            raise ValueError(f"Domain {self.name!r} has no documents; check its corpus and split")

    def text(self, record: Mapping[str, Any]) -> str:
        """The plain text of one record."""
        text = _decode(record[self.text_key])
        return self.clean(text) if self.clean else text


class SubsetRecords(Sequence):
    """The records of `records` at `indices`, in that order (a view, nothing is copied)."""

    def __init__(self, records: Sequence, indices: Sequence[int]):
        self._records, self._indices = records, list(indices)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int):
        return self._records[self._indices[index]]

    def __getitems__(self, indices: Sequence[int]) -> list:
        parent_indices = [self._indices[i] for i in indices]
        if hasattr(self._records, "__getitems__"):
            return self._records.__getitems__(parent_indices)
        return [self._records[i] for i in parent_indices]


def _decode(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_all(records: Sequence, desc: str = "") -> list:
    """Every record, read in chunks (array_record sources are fastest read in bulk)."""
    out = []
    for start in progress(range(0, len(records), _READ_CHUNK), f"Reading {desc}", "chunks"):
        indices = list(range(start, min(start + _READ_CHUNK, len(records))))
        out.extend(records.__getitems__(indices) if hasattr(records, "__getitems__") else map(records.__getitem__,
                                                                                              indices))
    return out


def read_field(records: Sequence, field: str, desc: str = "") -> list[str]:
    """`field` of every record, as text."""
    return [_decode(record[field]) for record in read_all(records, f"{field} ({desc})")]


def aligned_indices(records_by_language: Mapping[str, Sequence]) -> dict[str, list[int]]:
    """Per language, the indices of the paragraphs present in every language, in one common order.

    Paragraphs are matched by (page id, paragraph id); position i of every returned
    list is the same paragraph in each language.
    """
    index_by_key = {}
    for language, records in records_by_language.items():
        index_by_key[language] = {(r["page_id"], r["paragraph_id"]): i
                                  for i, r in enumerate(read_all(records, f"paragraph ids ({language})"))}
    common = sorted(set.intersection(*(set(keys) for keys in index_by_key.values())))
    return {language: [keys[key] for key in common] for language, keys in index_by_key.items()}


def libreoffice_sources(languages: Sequence[str], split: str, *, aligned: bool = False,
                        data_dir: str | os.PathLike | None = None,
                        manual_dir: str | os.PathLike | None = None) -> list[DomainSource]:
    """One domain per language of the LibreOffice help (built and cached on first use).

    With `aligned=True` each domain keeps only the paragraphs translated in every one
    of `languages`, in the same order, so domain i's record j translates domain k's record j.
    """
    records = {language: libreoffice_help.load_split(language, split, data_dir, manual_dir) for language in languages}
    if aligned:
        indices = aligned_indices(records)
        records = {language: SubsetRecords(records[language], indices[language]) for language in languages}
    return [DomainSource(language, records[language]) for language in languages]


def text_folder_sources(root: str | os.PathLike, split: str, *,
                        data_dir: str | os.PathLike | None = None) -> list[DomainSource]:
    """One domain per sub-folder (or file) of a user corpus folder (built and cached on first use)."""
    folder_builder = text_folder.prepare(root, data_dir)
    records = folder_builder.as_data_source(split=split)
    domains = read_field(records, "domain", os.fspath(root))
    names = folder_builder.builder_config.domains
    return [DomainSource(name, SubsetRecords(records, [i for i, domain in enumerate(domains) if domain == name]))
            for name in names]


def wiki40b_plain_text(text: str) -> str:
    """wiki40b text without its `_START_ARTICLE_`/`_START_SECTION_`/`_START_PARAGRAPH_`/`_NEWLINE_` markers."""
    return _WIKI40B_MARKERS.sub("\n", text).replace("_NEWLINE_", "\n").strip()


def catalog_source(name: str, split: str, *, text_key: str = "text", domain: str | None = None,
                   data_dir: str | os.PathLike | None = None) -> DomainSource:
    """A TFDS catalogue dataset as one domain, e.g. `catalog_source("wiki40b/de", "train")`.

    The dataset must be prepared in array_record format (`tfds build --file_format=array_record`),
    since reading other formats needs TensorFlow. wiki40b's structure markers are stripped.
    """
    records = tfds.data_source(name, split=split, data_dir=os.fspath(data_dir) if data_dir else None, download=False)
    clean = wiki40b_plain_text if name.split("/")[0] == "wiki40b" else None
    return DomainSource(domain or name, records, text_key, clean)


def from_specs(specs: Sequence[str], split: str, *, data_dir: str | os.PathLike | None = None,
               manual_dir: str | os.PathLike | None = None) -> list[DomainSource]:
    """Domains named by config strings, in order; each spec gives one or more domains:

    * `libreoffice_help/en-US,de`: one domain per language;
    * `libreoffice_help_aligned/en-US,de,ja,ru`: the same, restricted to the aligned view;
    * `folder:/path/to/corpus`: one domain per sub-folder or file (`text_folder`);
    * any other name, e.g. `wiki40b/de`: a prepared TFDS catalogue dataset as one domain.
    """
    domains = []
    for spec in specs:
        kind, _, rest = spec.partition("/")
        if kind in ("libreoffice_help", "libreoffice_help_aligned"):
            languages = [language.strip() for language in rest.split(",") if language.strip()]
            if not languages:
                raise ValueError(f"Data spec {spec!r} names no language; write e.g. '{kind}/en-US,de'")
            domains += libreoffice_sources(languages, split, aligned=kind.endswith("aligned"), data_dir=data_dir,
                                           manual_dir=manual_dir)
        elif spec.startswith("folder:"):
            domains += text_folder_sources(spec[len("folder:"):], split, data_dir=data_dir)
        else:
            domains.append(catalog_source(spec, split, data_dir=data_dir))
    names = [domain.name for domain in domains]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"Data specs {list(specs)} give domains {duplicates} more than once; each domain must be "
                         "named once")
    return domains
