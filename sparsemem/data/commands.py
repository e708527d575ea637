"""`sparsemem data prepare|stats`: build corpora into the TFDS data dir and print their sizes.

The corpus modules (TFDS) are imported by the commands, not here, so `sparsemem --help` stays fast.
"""

from __future__ import annotations

import argparse
import time

from sparsemem.data import splits

DEMO_LANGUAGES = "en-US,de,ja,ru"


def _add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    corpus = parser.add_mutually_exclusive_group()
    corpus.add_argument("--languages", default=DEMO_LANGUAGES,
                        help=f"comma-separated LibreOffice help languages (default {DEMO_LANGUAGES})")
    corpus.add_argument("--folder", help="a user corpus folder (one sub-folder or file per domain) instead")
    parser.add_argument("--data-dir", help="TFDS data directory where prepared corpora are cached "
                                           "(default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    parser.add_argument("--manual-dir", help="folder with libreoffice-help-*.deb files or their extracted trees, "
                                             "for machines without apt-get")


def _languages(args) -> list[str]:
    languages = [language.strip() for language in args.languages.split(",") if language.strip()]
    if not languages:
        raise ValueError(f"--languages {args.languages!r} names no language; give comma-separated codes, e.g. "
                         f"--languages {DEMO_LANGUAGES}")
    return languages


def prepare(args) -> int:
    from sparsemem.data import libreoffice_help, text_folder  # noqa: PLC0415 (TFDS)

    if args.folder:
        start = time.perf_counter()
        folder_builder = text_folder.prepare(args.folder, args.data_dir)
        print(f"{args.folder}: domains {', '.join(folder_builder.builder_config.domains)} in "
              f"{time.perf_counter() - start:.1f}s -> {folder_builder.data_dir}")
        return 0
    for language in _languages(args):
        start = time.perf_counter()
        help_builder = libreoffice_help.prepare(language, args.data_dir, args.manual_dir)
        size = sum(f.stat().length for f in help_builder.data_path.iterdir()) / 2**20
        print(f"libreoffice_help/{language}: {help_builder.info.splits.total_num_examples:,} paragraphs, "
              f"{size:.1f} MiB, {time.perf_counter() - start:.1f}s -> {help_builder.data_dir}")
    return 0


def show_stats(args) -> int:
    from sparsemem.data import sources, stats  # noqa: PLC0415 (TFDS)
    from sparsemem.tokenizer import Tokenizer  # noqa: PLC0415

    tokenizer = Tokenizer(args.tokenizer, bos_id=None, eos_id=0, pad_id=0) if args.tokenizer else None
    rows = []
    for split in splits.SPLITS:
        if args.folder:
            domains = sources.text_folder_sources(args.folder, split, data_dir=args.data_dir)
            document_key = "document_id"
        else:
            domains = sources.libreoffice_sources(_languages(args), split, data_dir=args.data_dir,
                                                  manual_dir=args.manual_dir)
            document_key = "page_id"
        rows += [stats.split_stats(domain, split, document_key=document_key, tokenizer=tokenizer)
                 for domain in domains]
    rows.sort(key=lambda row: (row.domain, splits.SPLITS.index(row.split)))
    print(stats.format_table(rows, document_label="documents" if args.folder else "pages"))
    if not args.folder and len(_languages(args)) > 1:
        aligned = {split: len(sources.libreoffice_sources(_languages(args), split, aligned=True,
                                                          data_dir=args.data_dir)[0].records)
                   for split in splits.SPLITS}
        print(f"\nAligned paragraphs (present in all of {args.languages}): "
              + ", ".join(f"{split} {count:,}" for split, count in aligned.items()))
    return 0


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="prepare corpora and show their statistics")
    commands = data.add_subparsers(dest="data_command", required=True)
    prepare_parser = commands.add_parser("prepare", help="build corpora into the TFDS data dir (cached)")
    _add_corpus_arguments(prepare_parser)
    prepare_parser.set_defaults(func=prepare)
    stats_parser = commands.add_parser("stats", help="pages/documents, paragraphs, characters, tokens per "
                                                     "domain and split (prepares the corpus if needed)")
    _add_corpus_arguments(stats_parser)
    stats_parser.add_argument("--tokenizer", help="tokenizer.json to count tokens with (omit: no token column)")
    stats_parser.set_defaults(func=show_stats)
