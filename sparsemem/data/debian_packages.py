"""Obtain the LibreOffice help pages of one language: `apt-get download` the Debian package
`libreoffice-help-<lang>` (no root needed) and unpack it, or take it from a manual directory.

A manual directory (for machines without apt) may hold the `.deb` files or trees
already extracted from them; anything holding `<lang>/text/` counts as a tree.
Unpacking is pure Python (`ar` + `tarfile`), so `dpkg-deb` is not needed either.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

# Languages with a `libreoffice-help-<lang>` package in Debian 12 (`apt-cache search ^libreoffice-help-`).
LANGUAGES = ("ca", "cs", "da", "de", "dz", "el", "en-GB", "en-US", "es", "et", "eu", "fi", "fr", "gl", "hi", "hu",
             "id", "it", "ja", "km", "ko", "nl", "om", "pl", "pt", "pt-BR", "ru", "sk", "sl", "sv", "tr", "vi",
             "zh-CN", "zh-TW")
_HELP_PREFIX = "usr/share/libreoffice/help/"


class PackageUnavailableError(RuntimeError):
    """The help package could not be obtained; `reason` is `no-apt`, `unknown-package` or `network`."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def check_language(language: str) -> str:
    """Return `language` if LibreOffice ships help for it, else raise naming the valid choices."""
    if language not in LANGUAGES:
        raise ValueError(f"Unknown LibreOffice help language {language!r}; choose one of {', '.join(LANGUAGES)} "
                         "(codes are case-sensitive, e.g. 'en-US', 'pt-BR', 'zh-CN')")
    return language


def package_name(language: str) -> str:
    return f"libreoffice-help-{check_language(language).lower()}"


def _tree_in(directory: Path, language: str) -> Path | None:
    for candidate in [directory / language, *directory.rglob(language)]:
        if (candidate / "text").is_dir():
            return candidate
    return None


def _deb_in(directory: Path, package: str) -> Path | None:
    debs = sorted(directory.glob(f"{package}_*.deb"))
    return debs[-1] if debs else None


def apt_download(package: str, directory: Path) -> Path:
    """Download `package`'s `.deb` into `directory` with `apt-get download`."""
    if shutil.which("apt-get") is None:
        raise PackageUnavailableError(
            f"apt-get is not installed, so {package} cannot be downloaded; fetch its .deb on a Debian/Ubuntu "
            "machine (`apt-get download " + package + "`) and pass the folder holding it as the manual directory",
            "no-apt")
    directory.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["apt-get", "download", package], cwd=directory, capture_output=True, text=True)
    deb = _deb_in(directory, package)
    if result.returncode != 0 or deb is None:
        unknown = "Unable to locate" in result.stderr or "has no installation candidate" in result.stderr
        hint = ("apt's package lists do not know it: run `apt-get update` (needs root) or pass a manual directory"
                if unknown else "check the network connection to the Debian mirror or pass a manual directory")
        raise PackageUnavailableError(f"`apt-get download {package}` failed ({hint}):\n{result.stderr.strip()}",
                                      "unknown-package" if unknown else "network")
    return deb


def _deb_data_member(deb: Path) -> bytes:
    """The `data.tar.*` member of a `.deb` (an `ar` archive)."""
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise ValueError(f"{deb} is not a Debian package (no ar header); delete it and download it again")
    offset = 8
    while offset + 60 <= len(blob):
        header = blob[offset:offset + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
        offset += 60
        if name.startswith("data.tar"):
            return blob[offset:offset + size]
        offset += size + (size % 2)
    raise ValueError(f"{deb} holds no data.tar member; delete it and download it again")


def extract_help(deb: Path, destination: Path) -> None:
    """Unpack the help pages (`usr/share/libreoffice/help/...`) of `deb` into `destination`."""
    try:
        archive = tarfile.open(fileobj=io.BytesIO(_deb_data_member(deb)), mode="r:*")
    except tarfile.ReadError as error:
        raise ValueError(f"Cannot read the data archive of {deb} ({error}); unpack it with "
                         "`dpkg-deb -x` and pass the extracted tree as the manual directory") from error
    with archive:
        members = [m for m in archive.getmembers() if m.name.lstrip("./").startswith(_HELP_PREFIX)]
        archive.extractall(destination, members=members, filter="data")


def help_tree(language: str, work_dir: Path, manual_dir: Path | None = None) -> Path:
    """The directory holding `language`'s help pages (its `text/` folder), obtaining it if needed.

    Looks in `manual_dir` first (extracted tree, then `.deb`), then in `work_dir` (earlier
    runs), and finally downloads the package into `work_dir` with apt-get.
    """
    package = package_name(language)
    unpacked = work_dir / package
    if manual_dir is not None:
        manual_dir = Path(manual_dir)
        if not manual_dir.is_dir():
            raise FileNotFoundError(f"Manual directory {manual_dir} does not exist; create it and put the "
                                    f"{package} .deb (or its extracted tree) there")
        tree = _tree_in(manual_dir, language)
        if tree is not None:
            return tree
        deb = _deb_in(manual_dir, package)
        if deb is None:
            raise FileNotFoundError(f"Neither {package}_*.deb nor an extracted '{language}/text' tree found in "
                                    f"manual directory {manual_dir}; add one or omit the manual directory to use "
                                    "apt-get")
    else:
        tree = _tree_in(unpacked, language) if unpacked.is_dir() else None
        if tree is not None:
            return tree
        deb = _deb_in(work_dir, package) or apt_download(package, work_dir)
    partial = work_dir / f"{package}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    extract_help(deb, partial)
    shutil.rmtree(unpacked, ignore_errors=True)
    partial.rename(unpacked)
    tree = _tree_in(unpacked, language)
    if tree is None:
        raise ValueError(f"{deb} holds no help pages for {language!r} under {_HELP_PREFIX}{language}/text; "
                         "is it the right package?")
    return tree
