"""TFDS builders offline: LibreOffice help from a manual directory, text folders, catalogue datasets."""

import collections
import io
import os
import stat
import tarfile

import pytest
import tensorflow_datasets as tfds

from sparsemem import cli
from sparsemem.data import debian_packages, libreoffice_help, pages, sources, splits, text_folder

LANGUAGES = ("en-US", "de", "fr")
PAGES = [f"text/swriter/page{i}" for i in range(80)]


def page_xhp(page: str, language: str) -> str:
    """A help page with prose, code and a paragraph left untranslated in some languages."""
    number = int(page.rsplit("page", 1)[1])
    word = {"en-US": "Writer", "de": "Schreiber", "fr": "Rédacteur"}[language]
    untranslated = "This sentence was never translated." if language == "en-US" or number % 4 == 0 else f"{word} {number}."
    extra = f'<paragraph role="paragraph" id="par_only_{language}">{word} only here.</paragraph>' if number == 1 else ""
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<helpdocument version="1.0"><meta><topic id="t{number}"><title id="tit">{word}</title></topic></meta><body>
<paragraph role="heading" id="hd_{number}" level="1">{word} page {number}</paragraph>
<paragraph role="paragraph" id="par_a{number}">The {word} explains topic {number} in prose.</paragraph>
<paragraph role="code" id="par_code{number}">x = {number}</paragraph>
<paragraph role="paragraph" id="par_u{number}">{untranslated}</paragraph>{extra}
</body></helpdocument>"""


def write_tree(root, language):
    for page in PAGES:
        path = root / language / f"{page}.xhp"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page_xhp(page, language), encoding="utf-8")


def write_deb(path, tree_root, language):
    """A minimal .deb (ar archive with data.tar.xz) holding `tree_root/language` under usr/share/libreoffice/help."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as archive:
        archive.add(tree_root / language, arcname=f"./usr/share/libreoffice/help/{language}")
    members = [(b"debian-binary", b"2.0\n"), (b"control.tar.xz", b""), (b"data.tar.xz", data.getvalue())]
    with open(path, "wb") as deb:
        deb.write(b"!<arch>\n")
        for name, content in members:
            deb.write(name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6) + b"100644".ljust(8)
                      + str(len(content)).encode().ljust(10) + b"`\n")
            deb.write(content + (b"\n" if len(content) % 2 else b""))


@pytest.fixture(scope="module")
def help_corpus(tmp_path_factory):
    """Manual directory with en-US and fr as extracted trees and de as a .deb; built once."""
    manual = tmp_path_factory.mktemp("manual")
    staging = tmp_path_factory.mktemp("staging")
    for language in LANGUAGES:
        write_tree(staging if language == "de" else manual, language)
    write_deb(manual / "libreoffice-help-de_7.4_all.deb", staging, "de")
    data_dir = tmp_path_factory.mktemp("tfds")
    for language in LANGUAGES:
        libreoffice_help.prepare(language, data_dir, manual)
    return data_dir, manual


def read_all(data_dir, manual, language, split):
    return list(libreoffice_help.load_split(language, split, data_dir, manual))


def test_records_are_prose_with_untranslated_dropped(help_corpus):
    data_dir, manual = help_corpus
    by_language = {language: [r for split in splits.SPLITS for r in read_all(data_dir, manual, language, split)]
                   for language in LANGUAGES}
    assert len(by_language["en-US"]) == 3 * len(PAGES) + 1
    assert len(by_language["de"]) == 3 * len(PAGES) + 1 - len(PAGES) // 4  # every 4th page left one untranslated
    texts = {r["text"].decode() for r in by_language["de"]}
    assert "Der Schreiber" not in texts and "x = 3" not in texts
    assert "This sentence was never translated." not in texts
    assert {r["language"] for r in by_language["fr"]} == {b"fr"}
    info = libreoffice_help.builder("de", data_dir).info
    assert dict(info.metadata["dropped"]) == {"role code": len(PAGES), "untranslated": len(PAGES) // 4}


def test_no_page_in_two_splits(help_corpus):
    data_dir, manual = help_corpus
    pages_of = {split: {r["page_id"] for language in LANGUAGES for r in read_all(data_dir, manual, language, split)}
                for split in splits.SPLITS}
    assert all(pages_of.values())
    assert not pages_of["train"] & pages_of["validation"]
    assert not pages_of["train"] & pages_of["test"]
    assert not pages_of["validation"] & pages_of["test"]
    for split, pages in pages_of.items():
        assert {splits.split_of(page.decode()) for page in pages} == {split}


def test_page_view_joins_each_pages_paragraphs_in_reading_order(help_corpus):
    data_dir, manual = help_corpus
    (german,) = sources.libreoffice_sources(["de"], "test", data_dir=data_dir, manual_dir=manual)
    view = pages.page_source(german)
    test_pages = sorted(page for page in PAGES if splits.split_of(page) == "test")
    assert [r["page_id"] for r in view.records] == test_pages
    for record in view.records:
        n = int(record["page_id"].rsplit("page", 1)[1])
        paragraphs = [f"Schreiber page {n}", f"The Schreiber explains topic {n} in prose."]
        paragraphs += [] if n % 4 == 0 else [f"Schreiber {n}."]  # untranslated: dropped
        assert view.text(record) == "\n\n".join(paragraphs)
    assert sum(view.text(r).count("\n\n") + 1 for r in view.records) == len(german.records)


def test_aligned_view_has_identical_ids_in_every_language(help_corpus):
    data_dir, manual = help_corpus
    domains = sources.libreoffice_sources(LANGUAGES, "train", aligned=True, data_dir=data_dir, manual_dir=manual)
    keys = [[(r["page_id"], r["paragraph_id"]) for r in domain.records] for domain in domains]
    assert keys[0] == keys[1] == keys[2]
    assert len(set(keys[0])) == len(keys[0])
    assert all(key[1] != b"par_only_en-US" for key in keys[0])
    train_pages = [page for page in PAGES if splits.split_of(page) == "train"]
    untranslated_in_train = sum(int(page.rsplit("page", 1)[1]) % 4 == 0 for page in train_pages)
    assert len(keys[0]) == 3 * len(train_pages) - untranslated_in_train
    unaligned = sources.libreoffice_sources(["en-US"], "train", data_dir=data_dir, manual_dir=manual)
    assert len(unaligned[0].records) > len(domains[0].records)


def test_second_prepare_reuses_the_cache(help_corpus, monkeypatch):
    data_dir, manual = help_corpus
    monkeypatch.setattr(libreoffice_help, "read_pages", lambda *a, **k: pytest.fail("rebuilt a cached corpus"))
    assert libreoffice_help.prepare("de", data_dir, manual).info.splits["train"].num_examples > 0


def test_unknown_language_and_missing_package_sources(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="Unknown LibreOffice help language 'english'.*en-US"):
        libreoffice_help.builder("english", tmp_path)
    with pytest.raises(FileNotFoundError, match="Neither libreoffice-help-ja_\\*.deb nor"):
        debian_packages.help_tree("ja", tmp_path / "work", manual_dir=tmp_path)
    monkeypatch.setattr(debian_packages.shutil, "which", lambda name: None)
    with pytest.raises(debian_packages.PackageUnavailableError, match="apt-get is not installed"):
        debian_packages.help_tree("ja", tmp_path / "work")


def test_apt_failure_is_explained(tmp_path, monkeypatch):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    apt = fake_bin / "apt-get"
    apt.write_text("#!/bin/sh\necho 'E: Unable to locate package libreoffice-help-ja' >&2\nexit 100\n")
    apt.chmod(apt.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(debian_packages.PackageUnavailableError, match="run `apt-get update`"):
        debian_packages.help_tree("ja", tmp_path / "work")


def write_folder(root):
    (root / "cooking").mkdir(parents=True)
    for i in range(100):
        (root / "cooking" / f"recipe{i}.txt").write_text(f"Recipe {i}: stir the soup {i} times.\n")
    (root / "cooking" / "empty.txt").write_text("  \n")
    (root / "law.jsonl").write_text("\n".join(f'{{"text": "Article {i} of the law."}}' for i in range(120)) + "\n")


def test_text_folder_domains_and_documents(tmp_path):
    write_folder(tmp_path / "corpus")
    data_dir = tmp_path / "tfds"
    counts = collections.Counter()
    for split in splits.SPLITS:
        for domain in sources.text_folder_sources(tmp_path / "corpus", split, data_dir=data_dir):
            counts[domain.name] += len(domain.records)
            assert {r["domain"] for r in domain.records} == {domain.name.encode()}
    assert counts == {"cooking": 100, "law": 120}
    info = text_folder.prepare(tmp_path / "corpus", data_dir).info
    assert dict(info.metadata["skipped_empty_documents"]) == {"cooking": 1}


def test_text_folder_bad_input_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        text_folder.prepare(tmp_path / "missing", tmp_path / "tfds")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="is empty"):
        text_folder.prepare(tmp_path / "empty", tmp_path / "tfds")
    (tmp_path / "small" / "a").mkdir(parents=True)
    (tmp_path / "small" / "a" / "one.txt").write_text("A single document.")
    with pytest.raises(ValueError, match="no documents in split"):
        text_folder.prepare(tmp_path / "small", tmp_path / "tfds")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "d.jsonl").write_text('{"text": "fine"}\n{"txt": "wrong key"}\n')
    with pytest.raises(ValueError, match="d.jsonl:2 is not a JSON object with a 'text' field"):
        text_folder.prepare(tmp_path / "bad", tmp_path / "tfds")
    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1" / "d.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="must be UTF-8"):
        text_folder.prepare(tmp_path / "latin1", tmp_path / "tfds")


def test_catalog_dataset_by_name():
    import tensorflow_datasets.text.wiki40b  # noqa: F401  registers the builder for the mock

    with tfds.testing.mock_data(num_examples=7, policy=tfds.testing.MockPolicy.USE_CODE):
        domain = sources.catalog_source("wiki40b/de", "train", domain="de")
    assert domain.name == "de" and len(domain.records) == 7
    assert domain.clean is sources.wiki40b_plain_text and isinstance(domain.text(domain.records[0]), str)


def test_cli_prepare_and_stats(help_corpus, tmp_path, capsys):
    data_dir, manual = help_corpus
    assert cli.main(["data", "prepare", "--languages", "en-US,de", "--data-dir", str(data_dir),
                     "--manual-dir", str(manual)]) == 0
    assert "libreoffice_help/de: 221 paragraphs" in capsys.readouterr().out
    assert cli.main(["data", "stats", "--languages", "en-US,de", "--data-dir", str(data_dir),
                     "--manual-dir", str(manual)]) == 0
    out = capsys.readouterr().out
    assert "| domain | split" in out and "| de     | train" in out
    assert sum(int(line.split("|")[4].replace(",", "")) for line in out.splitlines() if line.startswith("| de ")) == 221
    assert "Aligned paragraphs (present in all of en-US,de): train" in out
    write_folder(tmp_path / "corpus")
    assert cli.main(["data", "prepare", "--folder", str(tmp_path / "corpus"), "--data-dir", str(data_dir)]) == 0
    assert "domains cooking, law" in capsys.readouterr().out


def test_wiki40b_markers_are_stripped():
    stored = "\n_START_ARTICLE_\nBerlin\n_START_SECTION_\nGeschichte\n_START_PARAGRAPH_\nErste Zeile._NEWLINE_Zweite."
    assert sources.wiki40b_plain_text(stored) == "Berlin\nGeschichte\nErste Zeile.\nZweite."


def test_domains_from_config_specs(help_corpus, tmp_path):
    data_dir, manual = help_corpus
    write_folder(tmp_path / "corpus")
    import tensorflow_datasets.text.wiki40b  # noqa: F401  registers the builder for the mock

    domains = sources.from_specs(["libreoffice_help_aligned/en-US,de", f"folder:{tmp_path / 'corpus'}"], "train",
                                 data_dir=data_dir, manual_dir=manual)
    assert [d.name for d in domains] == ["en-US", "de", "cooking", "law"]
    assert len(domains[0].records) == len(domains[1].records)
    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):  # mocks every builder
        assert [d.name for d in sources.from_specs(["wiki40b/ja"], "train")] == ["wiki40b/ja"]
    with pytest.raises(ValueError, match="more than once"):
        sources.from_specs(["libreoffice_help/de", "libreoffice_help/de"], "train", data_dir=data_dir,
                           manual_dir=manual)
    with pytest.raises(ValueError, match="names no language"):
        sources.from_specs(["libreoffice_help/"], "train", data_dir=data_dir)
