"""TFDS builder `text_folder` for user corpora: one sub-folder (or file) per domain.

Layout: `root/<domain>/**/*.txt` (each file one document), `root/<domain>/**/*.jsonl`
(one JSON object per line, its `text` field one document), or `root/<domain>.txt` /
`root/<domain>.jsonl` directly. Each record holds `text`, `domain` and `document_id`
(path, plus `:line` for JSONL). Splits are assigned per document by `splits.split_of`.
The config name carries a fingerprint of the folder's files, so an edited corpus is
rebuilt rather than served stale from the cache.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
from pathlib import Path

import tensorflow_datasets as tfds

from sparsemem.data import splits
from sparsemem.progress import progress, tfds_bars

DOCUMENT_SUFFIXES = (".txt", ".jsonl")
log = logging.getLogger(__name__)


def check_domain_name(name: str, entry: Path) -> str:
    """`name` if it can name a domain's files (`memory/<name>.npz`), else a ValueError naming `entry`."""
    if not name or name.startswith(".") or any(c in name for c in "/\\\0") or not name.isprintable():
        raise ValueError(f"Corpus entry {entry} gives the domain name {name!r}, which cannot name a file (empty, "
                         "starting with '.', or holding a path separator or control character); rename it, e.g. "
                         "to the domain's language code")
    return name


def _document_files(root: Path) -> dict[str, list[Path]]:
    """Files per domain, checking the folder is a usable corpus."""
    if not root.is_dir():
        raise FileNotFoundError(f"Corpus folder {root} does not exist; pass a folder with one sub-folder or "
                                f"file per domain holding {' / '.join(DOCUMENT_SUFFIXES)} documents")
    domains = {}
    for entry in sorted(root.iterdir()):
        if entry.is_dir():
            files = sorted(p for p in entry.rglob("*") if p.suffix in DOCUMENT_SUFFIXES and p.is_file())
            if files:
                domains[check_domain_name(entry.name, entry)] = files
        elif entry.suffix in DOCUMENT_SUFFIXES:
            domains[check_domain_name(entry.stem, entry)] = [entry]
    if not domains:
        raise ValueError(f"Corpus folder {root} is empty: no {' / '.join(DOCUMENT_SUFFIXES)} files in it or in "
                         "its sub-folders; put each domain's documents in a sub-folder named after the domain")
    return domains


class TextFolderConfig(tfds.core.BuilderConfig):
    """A corpus folder; the name is `<folder>-<fingerprint of its files>`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.files = _document_files(self.root)
        self.domains = tuple(self.files)
        fingerprint = hashlib.sha256()
        for paths in self.files.values():
            for path in paths:
                stat = path.stat()
                fingerprint.update(f"{path.relative_to(self.root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        safe_name = re.sub(r"[^A-Za-z0-9_]", "_", self.root.name) or "corpus"
        super().__init__(name=f"{safe_name}-{fingerprint.hexdigest()[:12]}",
                         description=f"Text folder {self.root} with domains {', '.join(self.domains)}")


def _read_documents(path: Path, root: Path):
    """(document id, text) pairs of one file, with errors naming the file."""
    relative = path.relative_to(root).as_posix()
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"Cannot read corpus file {path} ({error}); fix or remove it (files must be UTF-8)") from error
    if path.suffix == ".txt":
        yield relative, content
        return
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number} is not a JSON object with a 'text' field ({error!r}); fix the line "
                             "or remove it") from error
        yield f"{relative}:{number}", text


class TextFolder(tfds.core.GeneratorBasedBuilder):
    """Documents of a user corpus folder, one domain per sub-folder or file."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # No URLs, hence no checksums; also avoids tfds's source lookup needing `importlib_resources`.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(),
                "domain": tfds.features.Text(),
                "document_id": tfds.features.Text(),
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        config = self.builder_config
        by_split = {name: [] for name in splits.SPLITS}
        skipped = collections.Counter()
        files = [(domain, path) for domain, paths in config.files.items() for path in paths]
        for domain, path in progress(files, f"Reading {config.root}", "files"):
            for document_id, text in _read_documents(path, config.root):
                if text.strip():
                    by_split[splits.split_of(f"{domain}/{document_id}")].append((domain, document_id, text))
                else:
                    skipped[domain] += 1
        if skipped:
            log.warning("text_folder %s: skipped empty documents per domain: %s", config.root, dict(skipped))
        if not any(by_split.values()):
            raise ValueError(f"Corpus folder {config.root} holds only empty documents; add text")
        splits.check_all_splits_filled({name: len(docs) for name, docs in by_split.items()},
                                       f"Corpus folder {config.root}")
        self.info.metadata["skipped_empty_documents"] = dict(skipped)
        return {name: self._generate_examples(documents) for name, documents in by_split.items()}

    def _generate_examples(self, documents):
        for domain, document_id, text in documents:
            yield f"{domain}/{document_id}", {"text": text, "domain": domain, "document_id": document_id}


def prepare(root: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> TextFolder:
    """Build the corpus folder `root` unless already built; returns the builder.

    Cached under `data_dir` (default: TFDS's, `$TFDS_DATA_DIR` or `~/tensorflow_datasets`).
    """
    folder_builder = TextFolder(config=TextFolderConfig(root),
                                data_dir=os.fspath(data_dir) if data_dir else None,
                                file_format="array_record")
    tfds_bars()
    folder_builder.download_and_prepare()
    return folder_builder
