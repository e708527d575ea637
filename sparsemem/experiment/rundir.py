"""The run directory: resolved config first, then metrics, checkpoints, exports, results, report.

```
runs/<name>/
  config.json            resolved config (written before any work; a rerun must match it)
  metrics.jsonl          one line per train step: {"variant", "step", "loss", ...}
  tensorboard/           the same scalars as TensorBoard events
  checkpoints/<variant>/ orbax run checkpoints (resume)
  export/<variant>/      mask.npz, sparsity.json, memory/<domain>.npz
  eval.json  analysis.json  timing.json
  report.md  plots/*.png
```
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any

import ml_collections

from sparsemem.experiment.config import defaults, differences, flatten


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)

    @classmethod
    def prepare(cls, path: str | os.PathLike, config: ml_collections.ConfigDict) -> "RunDir":
        """Create the run directory with `config.json`, or reopen it if its config equals `config`."""
        run = cls(path)
        resolved = json.loads(config.to_json())
        if run.config_file.exists():
            saved = json.loads(run.config().to_json())  # keys newer than the run compare as their defaults
            diff = differences(flatten(saved), flatten(resolved))
            if diff:
                raise ValueError(f"{run.path} already holds a run with a different config ({'; '.join(diff)}); "
                                 "pass another --workdir, or rerun with the same config to resume")
        else:
            run.path.mkdir(parents=True, exist_ok=True)
            run.write_json("config.json", resolved)
        return run

    @property
    def config_file(self) -> pathlib.Path:
        return self.path / "config.json"

    def config(self) -> ml_collections.ConfigDict:
        if not self.config_file.exists():
            raise FileNotFoundError(f"{self.config_file} not found: {self.path} is not a run directory "
                                    "(create one with `sparsemem run --config ...`)")
        config = defaults()  # keys added to the schema after the run was made keep their defaults
        for key, value in flatten(json.loads(self.config_file.read_text())).items():
            *parents, leaf = key.split(".")
            node = config
            for name in parents:
                node = node[name]
            with node.ignore_type():
                node[leaf] = tuple(value) if isinstance(value, list) else value
        return config

    def file(self, *parts: str) -> pathlib.Path:
        path = self.path.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write_json(self, name: str, value: Any) -> None:
        path = self.file(name)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(value, indent=2))
        os.replace(tmp, path)

    def read_json(self, name: str) -> Any | None:
        path = self.path / name
        return json.loads(path.read_text()) if path.exists() else None

    def record_time(self, phase: str, seconds: float) -> None:
        """Add `seconds` to `phase` in timing.json (phases of every invocation add up)."""
        timing = self.read_json("timing.json") or {}
        timing[phase] = timing.get(phase, 0.0) + seconds
        self.write_json("timing.json", timing)


class Timer:
    """`with Timer(run, "phase"):` adds the block's wall time to timing.json."""

    def __init__(self, run: RunDir, phase: str):
        self.run, self.phase = run, phase

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.run.record_time(self.phase, time.perf_counter() - self.start)
