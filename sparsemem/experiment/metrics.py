"""Training metrics: JSONL (one line per step), TensorBoard events, and a progress line with ETA."""

from __future__ import annotations

import json
import logging
import pathlib
import time

import jax
import tensorboardX

from sparsemem.files import DamagedFileError

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends per-step metrics of one variant to `metrics.jsonl` and `tensorboard/<variant>`.

    In a multi-host run only process 0 writes; every process logs its progress line.
    """

    def __init__(self, run_path: pathlib.Path, variant: str, domains: list[str], *, total_steps: int,
                 first_step: int, log_every: int):
        self.file = self.tb = None
        if jax.process_index() == 0:
            drop_torn_line(run_path / "metrics.jsonl")
            self.file = open(run_path / "metrics.jsonl", "a")
            self.tb = tensorboardX.SummaryWriter(str(run_path / "tensorboard" / variant))
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

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.tb.close()


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


def read_metrics(run_path: pathlib.Path) -> list[dict]:
    """Metric lines of a run; a step logged twice (before and after a resume) keeps its last line.

    An unfinished last line (a kill during a write) is skipped; any other unreadable line is an
    error naming the file and line.
    """
    path = run_path / "metrics.jsonl"
    if not path.exists():
        return []
    rows = {}
    lines = path.read_text(errors="replace").split("\n")
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
