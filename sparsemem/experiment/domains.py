"""A run's domains and their text: its corpus's, then those `sparsemem extend` added (`extensions.json`).

`extend` registers new domains here, `route` evaluates every domain's held-out text,
and `export` averages each domain's training documents into its routing centroid.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

from sparsemem.data import sources as sources_lib
from sparsemem.data.sources import DomainSource
from sparsemem.experiment import setup
from sparsemem.experiment.rundir import RunDir
from sparsemem.tokenizer import Tokenizer

REGISTRY = "extensions.json"
ROUTING_DOCUMENTS = 64  # training documents per domain averaged into its routing centroid


@dataclasses.dataclass(frozen=True)
class NewDomain:
    """A domain to add: a help-corpus language, or a folder of text documents (`text_folder` layout of one domain)."""

    name: str
    corpus: str  # "libreoffice_help" or "folder"
    path: str = ""

    def source(self, run: RunDir, split: str, data_dir: str | None) -> DomainSource:
        if self.corpus == "libreoffice_help":
            return sources_lib.libreoffice_sources([self.name], split, data_dir=data_dir)[0]
        # The text_folder builder makes one domain per sub-folder: give it a root holding just this folder.
        root = pathlib.Path(os.fspath(run.path)) / "extend" / "corpora" / self.name  # a local link
        link = root / self.name
        if not link.exists():
            root.mkdir(parents=True, exist_ok=True)
            link.symlink_to(pathlib.Path(self.path).resolve(), target_is_directory=True)
        (source,) = sources_lib.text_folder_sources(root, split, data_dir=data_dir)
        return source


def extensions(run: RunDir) -> list[list[NewDomain]]:
    """The run's extensions so far, each a list of its domains."""
    return [[NewDomain(**d) for d in group] for group in (run.read_json(REGISTRY) or [])]


def all_sources(run: RunDir, config, split: str) -> list[DomainSource]:
    """Every domain of the run (its corpus, then each extension's domains) for `split`."""
    own = setup.load_corpus(config)
    base = own.train if split == "train" else own.held_out_all
    data_dir = config.data.data_dir or None
    return base + [d.source(run, split, data_dir) for group in extensions(run) for d in group]


def routing_documents(source: DomainSource, tokenizer: Tokenizer, max_tokens: int,
                      count: int = ROUTING_DOCUMENTS) -> list[list[int]]:
    """Token ids of `count` training documents of a domain, spread over its split, each cut to `max_tokens`."""
    return [ids[:max_tokens] for ids in setup.token_ids(setup.spread(source, count), tokenizer)]
