"""Paths that may be local or on an object store (`gs://`), atomic writes, and JSON reads whose errors name the file.

Run directories and model folders are `etils.epath.Path`s (the abstraction orbax uses): a
local path behaves as `pathlib.Path`, and `gs://bucket/...` goes to the bucket (through
`gcsfs` when TensorFlow is not installed). Code that needs a real local file (numpy,
matplotlib, safetensors, tensorboardX) writes one and `atomic_write` uploads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable

from etils import epath

log = logging.getLogger(__name__)


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an `epath.Path`: local, or a `gs://` object-store URL (never a local folder named `gs:`)."""
    return epath.Path(path)


def is_local(path: str | os.PathLike) -> bool:
    return "://" not in os.fspath(path)


def require_local(path: str | os.PathLike, what: str, fix: str) -> pathlib.Path:
    """`path` as a local path; a URL (`gs://...`) is refused instead of becoming a local folder named `gs:`."""
    text = os.fspath(path)
    if not is_local(text):
        raise ValueError(f"{what} {text} is a URL, which is not supported here; {fix}")
    return pathlib.Path(text)


def local_copy(path: str | os.PathLike, cache: str | os.PathLike) -> pathlib.Path:
    """A local folder with the files of `path`: `path` itself if local, else a copy under `cache`.

    A `gs://` folder (a model) is copied file by file into `cache/<hash of the URL>`; a file
    already there with the same size is not copied again, so a restarted run stages nothing.
    """
    if is_local(path):
        return pathlib.Path(path)
    source = as_path(path)
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is not a folder on the object store (or is not readable with this "
                                "machine's credentials); check the URL and `gcloud auth list`")
    target = pathlib.Path(cache).expanduser() / hashlib.sha256(os.fspath(source).encode()).hexdigest()[:16]
    for file in _files(source):
        local = target / os.fspath(file)[len(os.fspath(source)):].lstrip("/")
        if local.exists() and local.stat().st_size == file.stat().length:
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        log.info("staging %s -> %s", file, local)
        atomic_write(local, lambda tmp, f=file: _copy(f, tmp))
    return target


def _files(folder: epath.Path):
    """Every file under `folder` (by `iterdir`, which gives object-store paths with their `gs://`)."""
    for entry in folder.iterdir():
        if entry.is_dir():
            yield from _files(entry)
        else:
            yield entry


def _copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    with as_path(source).open("rb") as src, as_path(target).open("wb") as dst:
        shutil.copyfileobj(src, dst, length=16 << 20)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[pathlib.Path], None]) -> None:
    """`write(tmp)` a local temporary file, then move it to `path`: readers never see a partial file.

    Locally the temporary file is in the same folder and is renamed; it is created private
    (mode 0600) and before the rename gets the mode a plain `open(path, "w")` would give (0666
    minus the umask), so shared exports stay readable. On an object store it is uploaded: an
    object appears only once its upload is complete.
    """
    if not is_local(path):
        with tempfile.TemporaryDirectory() as folder:
            tmp = pathlib.Path(folder) / as_path(path).name
            write(tmp)
            _copy(tmp, path)
        return
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(pathlib.Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def set_aside(path: str | os.PathLike, aside: str | os.PathLike) -> epath.Path:
    """Rename the damaged `path` to `aside` (or `aside-2`, `aside-3`, ... if taken), keeping it for inspection."""
    aside = as_path(aside)
    target, n = aside, 1
    while target.exists():
        n += 1
        target = aside.with_name(f"{aside.name}-{n}")
    as_path(path).rename(target)
    return target


def write_png(path: str | os.PathLike, figure: Any, dpi: int = 100) -> None:
    """A matplotlib figure as a PNG at `path` (local or `gs://`), written atomically."""
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight"))


def write_json(path: str | os.PathLike, value: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2)))


def read_json(path: str | os.PathLike, fix: str) -> Any:
    """The JSON value in `path`; a damaged file raises `ValueError` naming it and `fix`."""
    path = as_path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DamagedFileError(path, str(error), fix) from None


class DamagedFileError(ValueError):
    """A file the run or a model folder needs is truncated or unreadable; the message names it and the fix."""

    def __init__(self, path: str | os.PathLike, reason: str, fix: str):
        super().__init__(f"{path} is damaged or truncated ({reason}); {fix}")
        self.path, self.reason = as_path(path), reason
