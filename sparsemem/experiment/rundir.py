"""The run directory: marker and config first, then metrics, checkpoints, exports, results, report.

```
runs/<name>/
  .sparsemem-run         marker, written first: this folder is a run directory
  .lock                  holder of the folder: its pid and an flock (local), or an owner object (gs://)
  config.json            resolved config (written after setup succeeded; a rerun must match it)
  metrics.jsonl          one line per train step: {"variant", "step", "loss", ...}
  tensorboard/           the same scalars as TensorBoard events
  checkpoints/<variant>/ orbax run checkpoints (resume)
  export/<variant>/      mask.npz, sparsity.json, memory/<domain>.npz
  baselines/             random_mask.npz, score_mask.npz (fixed masks of baseline variants)
  seeds/<k>/             seed k's own run directory (train.seeds > 1)
  eval.json  analysis.json  timing.json
  report.md  plots/*.png
```

A folder that exists, is not empty and has neither the marker nor a run's `config.json`
is someone else's: it is refused, so nothing of it is overwritten or appended to.

The path may be a `gs://` URL (`files.as_path`). An object store has no flock: there
`.lock` is an object naming its holder (host, pid, start time), written when the run
opens the folder and removed when it ends. It does not exclude a second run (a preempted
slice leaves it behind, and must resume); a run that finds one warns, naming the holder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from typing import Any, Callable, Iterator

import ml_collections
from etils import epath

from sparsemem import files
from sparsemem.experiment.config import defaults, differences, flatten

log = logging.getLogger(__name__)

MARKER = ".sparsemem-run"
LOCK = ".lock"
# Top-level keys every run's config.json has (recognises runs made before the marker existed).
_RUN_CONFIG_KEYS = {"name", "model", "data", "koff", "train"}


class RunDirError(ValueError):
    """The work directory cannot be used for this run (foreign folder, other config, in use)."""


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = files.as_path(path)
        self.primary = True  # False in processes other than 0 of a multi-host run: they write nothing

    @classmethod
    def check(cls, path: str | os.PathLike, config: ml_collections.ConfigDict, *,
              primary: bool = True) -> "RunDir":
        """The run directory at `path` if `config` may run there; writes nothing.

        Refuses a file, a non-empty folder that is not a run directory, a run directory
        holding another config, and (for the `primary` process, the one that holds the
        lock) one that another `sparsemem run` holds.
        """
        run = cls(path)
        if run.path.exists() and not run.path.is_dir():
            raise RunDirError(f"--workdir {run.path} is a file; pass a folder (new or a run directory)")
        if run.is_run():
            run._check_config(config)
            holder = run._holder() if primary else None
            if holder is not None:
                raise run._in_use(holder)
        elif run.path.exists() and any(run.path.iterdir()):
            raise RunDirError(f"--workdir {run.path} is a non-empty folder that is not a sparsemem run directory "
                              f"(no {MARKER} or run config.json); nothing in it was touched. Pass a new or empty "
                              "folder, or a run directory made by `sparsemem run`")
        return run

    @classmethod
    def prepare(cls, path: str | os.PathLike, config: ml_collections.ConfigDict) -> "RunDir":
        """A run directory holding `config`, made (or reopened) at `path`, its lock released again."""
        run = cls.check(path, config)
        with run.open(config):
            return run

    @contextlib.contextmanager
    def open(self, config: ml_collections.ConfigDict, *, primary: bool = True,
             barrier: Callable[[], None] = lambda: None) -> Iterator["RunDir"]:
        """Within the block the folder is this run's directory: marker, lock, `config.json`.

        Only the `primary` process (process 0 of a multi-host run) writes these and holds the
        lock; every process then calls `barrier()`, so the others enter the block only once
        the folder is a run directory.
        """
        self.primary = primary
        if not primary:
            barrier()
            self.check(self.path, config, primary=False)
            yield self
            return
        self.check(self.path, config)
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / MARKER).exists():
            files.atomic_write(self.path / MARKER, lambda tmp: tmp.write_text("sparsemem run directory\n"))
        with self.locked():
            self._check_config(config)  # again, under the lock: another process may have started it meanwhile
            if not self.config_file.exists():
                self.write_json("config.json", _resolved(config))
            barrier()
            yield self

    @contextlib.contextmanager
    def locked(self) -> Iterator["RunDir"]:
        """Hold the folder's lock (refused, naming the holder's pid, while another process holds it).

        On an object store: the `.lock` object, which names the holder but excludes no one.
        """
        if not files.is_local(self.path):
            with self._lock_object():
                yield self
            return
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise self._in_use(holder) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield self
        finally:
            os.close(fd)  # closing releases the flock; a killed process releases it too

    @contextlib.contextmanager
    def _lock_object(self) -> Iterator[None]:
        lock = self.path / LOCK
        if lock.exists():
            log.warning("%s names another `sparsemem run` (%s): if it was killed or preempted, nothing to do; if it "
                        "is still running, stop one of the two (an object store has no lock that excludes it)",
                        lock, lock.read_text().strip())
        lock.write_text(f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)

    def _in_use(self, holder: str) -> RunDirError:
        return RunDirError(f"{self.path} is in use by another `sparsemem run` (pid {holder}); wait for it to finish "
                           "or stop it, or pass another --workdir")

    def _holder(self) -> str | None:
        """The pid holding the lock, or None when it is free (always on an object store)."""
        if not files.is_local(self.path) or not (self.path / LOCK).exists():
            return None
        fd = os.open(self.path / LOCK, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except OSError:
            return os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)

    def is_run(self) -> bool:
        if (self.path / MARKER).exists():
            return True
        if not self.config_file.is_file():
            return False
        try:
            saved = files.read_json(self.config_file, "")
        except ValueError:
            return False
        return isinstance(saved, dict) and _RUN_CONFIG_KEYS <= set(saved)

    def _check_config(self, config: ml_collections.ConfigDict) -> None:
        if not self.config_file.exists():
            return
        saved = _resolved(self.config())  # keys newer than the run compare as their defaults
        diff = differences(flatten(saved), flatten(_resolved(config)))
        if diff:
            raise RunDirError(f"{self.path} already holds a run with a different config ({'; '.join(diff)}); "
                              "pass another --workdir, or rerun with the same config to resume")

    @property
    def config_file(self) -> epath.Path:
        return self.path / "config.json"

    def config(self) -> ml_collections.ConfigDict:
        if not self.config_file.exists():
            raise FileNotFoundError(f"{self.config_file} not found: {self.path} is not a run directory "
                                    "(create one with `sparsemem run --config ...`)")
        saved = files.read_json(self.config_file, "restore it from a copy, or start the run again in a new --workdir")
        config = defaults()  # keys added to the schema after the run was made keep their defaults
        for key, value in flatten(saved).items():
            *parents, leaf = key.split(".")
            node = config
            for name in parents:
                node = node[name]
            with node.ignore_type():
                node[leaf] = tuple(value) if isinstance(value, list) else value
        return config

    def file(self, *parts: str) -> epath.Path:
        path = self.path.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write_json(self, name: str, value: Any) -> None:
        if self.primary:
            files.write_json(self.file(name), value)

    def read_json(self, name: str) -> Any | None:
        """The JSON file `name`, None if missing; a damaged file raises an error naming it."""
        path = self.path / name
        if not path.exists():
            return None
        return files.read_json(path, f"rerun `sparsemem run` with this run's config in {self.path}: it sets damaged "
                                     "results aside and recomputes them")

    def read_result(self, name: str) -> Any | None:
        """Like `read_json`, for a result the run can recompute: a damaged file is set aside and reads as None."""
        try:
            return self.read_json(name)
        except files.DamagedFileError as error:
            if not self.primary:
                return None
            aside = files.set_aside(self.path / name, self.path / f"{name}.damaged")
            log.warning("%s is damaged (%s); moved it to %s and recomputing it", error.path, error.reason, aside)
            return None

    def record_time(self, phase: str, seconds: float) -> None:
        """Add `seconds` to `phase` in timing.json (phases of every invocation add up; process 0 only)."""
        if not self.primary:
            return
        timing = self.read_result("timing.json") or {}
        timing[phase] = timing.get(phase, 0.0) + seconds
        self.write_json("timing.json", timing)


def _resolved(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json())


class Timer:
    """`with Timer(run, "phase"):` adds the block's wall time to timing.json."""

    def __init__(self, run: RunDir, phase: str):
        self.run, self.phase = run, phase

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.run.record_time(self.phase, time.perf_counter() - self.start)
