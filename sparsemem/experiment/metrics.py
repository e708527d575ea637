"""Training metrics: JSONL (one line per step), TensorBoard events, and a progress line with ETA.

An object store cannot append to a file, and tensorboardX reaches `gs://` only through its
own Cloud Storage client: for a `gs://` run directory both files are written in a local
staging folder and uploaded (whole, each an atomic object write) every `log_every` steps
and when the log closes (also on SIGTERM). A SIGKILL loses at most the lines since the
last upload; the resumed run logs the steps after its checkpoint again.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import tempfile
import time

import jax
import tensorboardX
from etils import epath

from sparsemem import files
from sparsemem.files import DamagedFileError

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends per-step metrics of one variant to `metrics.jsonl` and `tensorboard/<variant>`.

    In a multi-host run only process 0 writes; every process logs its progress line.
    """

    def __init__(self, run_path: epath.Path, variant: str, domains: list[str], *, total_steps: int,
                 first_step: int, log_every: int):
        self.file = self.tb = None
        self.remote = None if files.is_local(run_path) else run_path  # uploaded from the local staging folder
        if jax.process_index() == 0:
            self.local = pathlib.Path(tempfile.mkdtemp(prefix="sparsemem-metrics-")) if self.remote else run_path
            if self.remote and (run_path / "metrics.jsonl").exists():
                files.atomic_write(self.local / "metrics.jsonl",
                                   lambda tmp: tmp.write_bytes((run_path / "metrics.jsonl").read_bytes()))
            drop_torn_line(self.local / "metrics.jsonl")
            self.file = open(self.local / "metrics.jsonl", "a")
            self.tb = tensorboardX.SummaryWriter(os.fspath(self.local / "tensorboard" / variant),  # one file per
                                                 filename_suffix=f".from-step-{first_step}")  # (re)start: no clash
        self.variant, self.domains = variant, domains
        self.total, self.first, self.log_every = total_steps, first_step, log_every
        self.start = time.perf_counter()

    def __call__(self, step: int, metrics: dict) -> None:
        by_domain = {self.domains[d]: loss for d, loss in metrics["loss_by_domain"].items()}
        metrics = {k: v for k, v in metrics.items() if k != "loss_by_domain"}
        if self.file is not None:
            self._write(step, metrics, by_domain)
        if step % self.log_every == 0 or step == self.total:
            done = step - self.first
            eta = (time.perf_counter() - self.start) / max(done, 1) * (self.total - step)
            log.info("[%s] step %d/%d  loss %.3f  sparsity %.3f (target %.3f)  %.0f tok/s  ETA %s", self.variant,
                     step, self.total, metrics["loss"], metrics["expected_sparsity"], metrics["target"],
                     metrics["tokens_per_s"], _duration(eta))

    def _write(self, step: int, metrics: dict, by_domain: dict) -> None:
        self.file.write(json.dumps({"variant": self.variant, "step": step, **metrics,
                                    "loss_by_domain": by_domain}) + "\n")
        self.file.flush()
        for key, value in metrics.items():
            self.tb.add_scalar(key, value, step)
        for domain, value in by_domain.items():
            self.tb.add_scalar(f"loss/{domain}", value, step)
        if self.remote and (step % self.log_every == 0 or step == self.total):
            self._upload()

    def _upload(self) -> None:
        """Copy the staged metrics.jsonl and TensorBoard events to the object store."""
        self.tb.flush()
        for path in [self.local / "metrics.jsonl", *(self.local / "tensorboard").rglob("*")]:
            if path.is_file():
                files.atomic_write(self.remote / path.relative_to(self.local),
                                   lambda tmp, source=path: shutil.copyfile(source, tmp))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.tb.close()
            if self.remote:
                self._upload()
                shutil.rmtree(self.local)


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def drop_torn_line(path: pathlib.Path) -> None:
    """Cut a last line that a kill left unfinished (no newline), so the next line starts on its own.

    The step it was logging had not been checkpointed yet, so the resumed run logs it again.
    """
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping an unfinished last line (%d bytes) left by an interrupted write", path,
                    len(data) - keep)
        with open(path, "r+b") as f:
            f.truncate(keep)


def read_metrics(run_path: str | os.PathLike) -> list[dict]:
    """Metric lines of a run; a step logged twice (before and after a resume) keeps its last line.

    An unfinished last line (a kill during a write) is skipped; any other unreadable line is an
    error naming the file and line.
    """
    path = files.as_path(run_path) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = {}
    lines = path.read_bytes().decode(errors="replace").split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows[(row["variant"], row["step"])] = row
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            if number == len(lines):  # the text after the last newline: a torn write
                log.warning("%s: skipping an unfinished last line", path)
                continue
            raise DamagedFileError(f"{path}:{number}", f"not a metrics line: {error!r}",
                                   "restore the file, or delete the line (the report then lacks that step)") from None
    return sorted(rows.values(), key=lambda r: (r["variant"], r["step"]))
