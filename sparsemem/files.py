"""Atomic file writes whose result honours the umask, and JSON reads whose errors name the file."""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any, Callable


def require_local(path: str | os.PathLike, what: str, fix: str) -> pathlib.Path:
    """`path` as a local path; a URL (`gs://...`) is refused instead of becoming a local folder named `gs:`."""
    text = os.fspath(path)
    if "://" in text:
        raise ValueError(f"{what} {text} is a URL, which is not supported here; {fix}")
    return pathlib.Path(text)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[pathlib.Path], None]) -> None:
    """Write via a temporary file in the same folder, then rename: readers never see a partial file.

    The temporary file is created private (mode 0600); before the rename it gets the mode a
    plain `open(path, "w")` would give (0666 minus the umask), so shared exports stay readable.
    """
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


def set_aside(path: str | os.PathLike, aside: str | os.PathLike) -> pathlib.Path:
    """Rename the damaged `path` to `aside` (or `aside-2`, `aside-3`, ... if taken), keeping it for inspection."""
    aside = pathlib.Path(aside)
    target, n = aside, 1
    while target.exists():
        n += 1
        target = aside.with_name(f"{aside.name}-{n}")
    os.rename(path, target)
    return target


def write_json(path: str | os.PathLike, value: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2)))


def read_json(path: str | os.PathLike, fix: str) -> Any:
    """The JSON value in `path`; a damaged file raises `ValueError` naming it and `fix`."""
    path = pathlib.Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DamagedFileError(path, str(error), fix) from None


class DamagedFileError(ValueError):
    """A file the run or a model folder needs is truncated or unreadable; the message names it and the fix."""

    def __init__(self, path: str | os.PathLike, reason: str, fix: str):
        super().__init__(f"{path} is damaged or truncated ({reason}); {fix}")
        self.path, self.reason = pathlib.Path(path), reason
