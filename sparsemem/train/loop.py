"""The KOFF train loop: steps, per-step metrics, periodic checkpoints, preemption and NaN stops.

- SIGTERM (what a TPU VM receives before preemption) sets a flag; the loop
  finishes the current step, saves a checkpoint and returns `"preempted"`, so the
  caller exits with a status saying so (`sparsemem run`: 75) and a later run resumes from it.
- A non-finite loss raises `NonFiniteLossError` *before* anything is saved, so the
  last checkpoint on disk is the last good state.
- Every step blocks on its loss (needed for the NaN check; it also keeps fake
  multi-device CPU runs from deadlocking).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

from sparsemem.checkpoints.run_state import RunCheckpointer
from sparsemem.train.state import TrainState
from sparsemem.train.trainer import KoffTrainer

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stopped without saving the bad state."""


@contextlib.contextmanager
def sigterm_flag() -> Iterator[dict[str, bool]]:
    """Within the block, SIGTERM sets `flag["requested"]` instead of killing the process."""
    flag = {"requested": False}

    def handler(signum, frame):
        log.warning("SIGTERM received: saving a checkpoint after this step and stopping")
        flag["requested"] = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def host_metrics(metrics: Mapping[str, jax.Array], seconds: float, batch_tokens: int) -> dict[str, Any]:
    """Scalars as floats, per-domain losses as `{domain: mean loss}` over the domains in the step, tokens/s."""
    m = jax.device_get(metrics)
    out = {k: float(v) for k, v in m.items() if np.ndim(v) == 0}
    seen = np.flatnonzero(m["tokens_by_domain"] > 0)
    out["loss_by_domain"] = {int(d): float(m["loss_sum_by_domain"][d] / m["tokens_by_domain"][d]) for d in seen}
    out["tokens_per_s"] = batch_tokens / seconds
    out["step_seconds"] = seconds
    return out


def train(trainer: KoffTrainer, state: TrainState, batches: Iterator[Mapping[str, np.ndarray]], *, num_steps: int,
          checkpointer: RunCheckpointer | None = None, save_every: int = 0,
          data_state: Callable[[], dict] | None = None, on_metrics: Callable[[int, dict], None] | None = None,
          log_every: int = 10) -> tuple[TrainState, str]:
    """Train from `state.step` up to `num_steps`; returns `(state, "done" | "preempted" | "exhausted")`.

    `data_state()` returns the data iterator's resumable state *after* the batches
    consumed so far; it is saved with every checkpoint. `save_every=0` saves only
    at the end (and on SIGTERM). `on_metrics(step, metrics)` gets every step's host
    metrics (see `host_metrics`); every `log_every` steps a progress line is logged.
    """

    def save(state):
        if checkpointer is not None:
            checkpointer.save(int(state.step), state, data_state() if data_state else None)

    status = "done"
    with sigterm_flag() as sigterm:
        while int(state.step) < num_steps:
            batch = next(batches, None)
            if batch is None:
                status = "exhausted"
                break
            start = time.perf_counter()
            state, metrics = trainer.train_step(state, batch)
            loss = float(metrics["loss"])  # blocks on the step
            step = int(state.step)
            if not math.isfinite(loss):
                last = checkpointer.latest_step() if checkpointer is not None else None
                where = f"step {last} in {checkpointer.directory}" if last is not None else "none saved"
                raise NonFiniteLossError(
                    f"loss is {loss} at step {step}; stopped without saving (last good checkpoint: {where}). "
                    "Lower memory_lr/gate_lr, check the batch for empty or corrupt examples, or resume from it.")
            host = host_metrics(metrics, time.perf_counter() - start, np.size(batch["inputs"]))
            if on_metrics is not None:
                on_metrics(step, host)
            if log_every and step % log_every == 0:
                log.info("step %d/%d  loss %.4f  sparsity %.3f (target %.3f)  polarised %.2f  %.0f tokens/s",
                         step, num_steps, loss, host["expected_sparsity"], host["target"], host["polarised"],
                         host["tokens_per_s"])
            if sigterm["requested"]:
                save(state)
                return state, "preempted"
            if save_every and step % save_every == 0 and step < num_steps:
                save(state)
    save(state)
    return state, status
