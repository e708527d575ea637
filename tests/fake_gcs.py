"""A `gs://` object store on local disk, for tests: every `gs://bucket/x` read or write lands in `root/bucket/x`.

Two doubles, one folder: an fsspec filesystem registered for the `gs`/`gcs` protocols
(what `etils.epath` uses for `gs://` without TensorFlow, in place of `gcsfs`), and
tensorstore's `file` driver in place of its `gcs` driver (what orbax uses for checkpoint
arrays); orbax's Cloud Storage client call (does the bucket have a hierarchical namespace?)
answers "no". Only the network and credentials are left out; paths stay `gs://` URLs.
"""

from __future__ import annotations

import pathlib
import sys

import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils


class FakeGcsFileSystem(DirFileSystem):
    protocol = ("gs", "gcs")
    cachable = False
    root = ""

    def __init__(self, *args, finalize_on_close: bool = True, **kwargs):
        super().__init__(path=self.root, fs=LocalFileSystem(auto_mkdir=True))


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """`gs://` routed to `tmp_path/store` for the test; yields that folder."""
    yield install(monkeypatch, tmp_path / "store")
    epath_backend.fsspec_backend._get_filesystem.cache_clear()  # noqa: SLF001


def install(monkeypatch: pytest.MonkeyPatch, root: pathlib.Path) -> pathlib.Path:
    """Route `gs://` to `root` until `monkeypatch` undoes it; returns `root`."""
    root.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(FakeGcsFileSystem, "root", str(root))
    registry = sys.modules["fsspec.registry"]._registry
    for name in FakeGcsFileSystem.protocol:
        monkeypatch.setitem(registry, name, FakeGcsFileSystem)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()  # noqa: SLF001 (epath caches one per protocol)
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)  # a flat bucket
    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs",
                        lambda url: {"driver": "file", "path": str(root / url[len("gs://"):])})
    return root
