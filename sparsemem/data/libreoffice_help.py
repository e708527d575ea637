"""TFDS builder `libreoffice_help`: natural-language paragraphs of the LibreOffice help, one config per language.

Each record is one paragraph: `text`, `paragraph_id` (shared across languages),
`page_id` (the help page, e.g. `text/swriter/main0202`), `position` (its index among
the page's kept paragraphs: records are stored shuffled, this restores reading order)
and `language`. Splits are
assigned per help page (`splits.split_of`), so all paragraphs of a page, in every
language, land in the same split. Stored as array_record: building and reading need
no TensorFlow (`load_split` returns a random-access data source grain can consume).
"""

from __future__ import annotations

import collections
import functools
import logging
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from sparsemem.data import debian_packages, help_pages, paragraph_filters, splits
from sparsemem.progress import progress, tfds_bars

log = logging.getLogger(__name__)


class LibreofficeHelp(tfds.core.GeneratorBasedBuilder):
    """Paragraph-aligned multilingual text from the LibreOffice help (MPL-2.0)."""

    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {"1.0.0": "Paragraphs of the Debian 12 (LibreOffice 7.4) help packages.",
                     "1.1.0": "A CJK character counts as two letters in the prose test (keeps short CJK headings).",
                     "1.2.0": "`position`: a paragraph's index on its page (whole pages can be read in order)."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=language, description=f"LibreOffice help in {language}")
                       for language in debian_packages.LANGUAGES]
    # Downloads no URLs, so there is no checksums file to locate; this also skips tfds's source
    # lookup, which imports the `importlib_resources` backport tfds does not declare on Python 3.11.
    code_path = None
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Optional. Without a manual directory the builder runs `apt-get download libreoffice-help-<lang>`. "
        "On machines without apt, put the libreoffice-help-<lang>_*.deb files (also libreoffice-help-en-us, "
        "the reference for untranslated paragraphs) or their extracted trees into the manual directory.")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(),
                "paragraph_id": tfds.features.Text(),
                "page_id": tfds.features.Text(),
                "position": tfds.features.Scalar(dtype=np.int32),
                "language": tfds.features.Text(),
            }),
            homepage="https://help.libreoffice.org",
            license="MPL-2.0",
            metadata=tfds.core.MetadataDict(),
        )

    def _manual_dir(self, dl_manager) -> Path | None:
        try:
            return Path(dl_manager.manual_dir)
        except (AssertionError, ValueError):  # tfds raises these when no manual directory exists
            return None

    def _split_generators(self, dl_manager):
        language = self.builder_config.name
        work_dir = Path(dl_manager.download_dir) / "libreoffice_help"
        manual_dir = self._manual_dir(dl_manager)
        tree = debian_packages.help_tree(language, work_dir, manual_dir)
        reference = None
        if language != paragraph_filters.REFERENCE_LANGUAGE:
            reference_tree = debian_packages.help_tree(paragraph_filters.REFERENCE_LANGUAGE, work_dir, manual_dir)
            reference = _reference_pages(reference_tree)
        dropped = collections.Counter()
        pages = read_pages(tree, reference=reference, dropped=dropped, desc=language)
        if not any(pages.values()):
            raise ValueError(f"No natural-language paragraphs found in {tree}; is it a LibreOffice help tree?")
        log.info("libreoffice_help/%s: dropped paragraphs by reason: %s", language, dict(dropped))
        self.info.metadata["dropped"] = dict(dropped)
        by_split = {name: [] for name in splits.SPLITS}
        for page_id, paragraphs in pages.items():
            by_split[splits.split_of(page_id)].append((page_id, paragraphs))
        splits.check_all_splits_filled({name: sum(len(p) for _, p in pages) for name, pages in by_split.items()},
                                       f"LibreOffice help tree {tree}")
        return {name: self._generate_examples(language, page_list) for name, page_list in by_split.items()}

    def _generate_examples(self, language, pages):
        for page_id, paragraphs in pages:
            for position, paragraph in enumerate(paragraphs):
                yield f"{page_id}#{paragraph.paragraph_id}", {
                    "text": paragraph.text, "paragraph_id": paragraph.paragraph_id,
                    "page_id": page_id, "position": position, "language": language}


@functools.lru_cache(maxsize=1)
def _reference_pages(tree: Path) -> dict[str, list[help_pages.HelpParagraph]]:
    """English pages, parsed once per process however many languages are built against them."""
    return read_pages(tree, reference=None, desc=paragraph_filters.REFERENCE_LANGUAGE + " reference")


def read_pages(tree: Path, *, reference: dict[str, list] | None, dropped: collections.Counter | None = None,
               desc: str = "") -> dict[str, list[help_pages.HelpParagraph]]:
    """Natural-language paragraphs of every page under `tree`, keyed by page id (progress shown)."""
    dropped = collections.Counter() if dropped is None else dropped
    pages = {}
    for page_id, path in progress(help_pages.page_files(tree).items(), f"Parsing help pages ({desc})", "pages"):
        page_reference = None
        if reference is not None:
            page_reference = {p.paragraph_id: p.text for p in reference.get(page_id, [])}
        pages[page_id] = paragraph_filters.natural_paragraphs(
            help_pages.parse_page(path), reference=page_reference, dropped=dropped)
    return pages


def builder(language: str, data_dir: str | os.PathLike | None = None) -> LibreofficeHelp:
    """The builder for one language, storing under `data_dir` (default: TFDS's, `$TFDS_DATA_DIR` or
    `~/tensorflow_datasets`)."""
    debian_packages.check_language(language)
    return LibreofficeHelp(config=language, data_dir=os.fspath(data_dir) if data_dir else None,
                           file_format="array_record")


def prepare(language: str, data_dir: str | os.PathLike | None = None,
            manual_dir: str | os.PathLike | None = None) -> LibreofficeHelp:
    """Build `language` unless already built (cached under `data_dir`); returns the builder."""
    help_builder = builder(language, data_dir)
    download_config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir) if manual_dir else None)
    tfds_bars()
    help_builder.download_and_prepare(download_config=download_config)
    return help_builder


def load_split(language: str, split: str, data_dir: str | os.PathLike | None = None,
               manual_dir: str | os.PathLike | None = None):
    """Random-access records of one language and split, building the corpus first if needed."""
    if split not in splits.SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {', '.join(splits.SPLITS)}")
    return prepare(language, data_dir, manual_dir).as_data_source(split=split)
