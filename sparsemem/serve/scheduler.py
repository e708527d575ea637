"""Cross-request batching for the HTTP server: one worker thread runs every model step.

Requests wait in a bounded FIFO queue (`QueueFullError` when full). The worker takes
the oldest request after a short collection window, batches it with the queued
requests that can share its compiled steps (same prompt-length bucket, same sampling
settings, memory or bare backbone), prefills them together and decodes them together
(`decode_steps`), each row with its own domain's memory (`MemoryBank.rows`). A batch
runs until every row is done: EOS, its own `max_new_tokens`, or cancelled (client gone,
stop string seen); the rows still queued wait for the next batch.

To bound recompiles the batch's row count is padded up to a power of two (copies of
its first row) and its decode length up to a multiple of `PROMPT_BUCKET`; greedy
outputs do not depend on either (rows are independent, extra cache slots are masked).
Callbacks run on the worker thread; the server hands them on to its event loop.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import pathlib
import threading
import time
from typing import Callable

from sparsemem.checkpoints.hf import load_hf_checkpoint, load_tokenizer
from sparsemem.models.decoder import Decoder
from sparsemem.serve.compact_decoder import CompactDecoder, RowMemory
from sparsemem.serve.deploy import AUTO, Deployment
from sparsemem.serve.generate import PROMPT_BUCKET, SamplingConfig, bucket_length, decode_steps
from sparsemem.serve.memory import MemoryBank
from sparsemem.serve.routing import CentroidRouter, RoutingError
from sparsemem.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The request queue is full; the client should retry later."""


class DrainingError(RuntimeError):
    """The server is shutting down and accepts no new requests."""


@dataclasses.dataclass
class ServedModel:
    """What a server runs: a backbone (compacted or plain), its tokenizer and, for an export, its domains' memory
    and the router that picks a domain for `model: "auto"`."""

    name: str
    model: Decoder | CompactDecoder
    tokenizer: Tokenizer
    bank: MemoryBank | None = None
    router: CentroidRouter | None = None

    @classmethod
    def from_export(cls, path: str | pathlib.Path, *, offload: bool = False, name: str = "backbone") -> "ServedModel":
        deployment = Deployment.load(path, offload=offload)
        if deployment.tokenizer is None:
            raise FileNotFoundError(f"{path}/backbone has no tokenizer.json; the server needs one to read text "
                                    "prompts (export the run again from a model folder with a tokenizer)")
        return cls(name, deployment.backbone.model, deployment.tokenizer, deployment.bank, deployment.router)

    @classmethod
    def from_hf(cls, folder: str | pathlib.Path, name: str | None = None) -> "ServedModel":
        model = load_hf_checkpoint(folder)
        return cls(name or pathlib.Path(folder).name, model, load_tokenizer(folder, model.cfg))

    @property
    def domains(self) -> tuple[str, ...]:
        return self.bank.domains if self.bank is not None else ()

    def route(self, prompt: list[int]) -> str:
        """The domain whose routing centroid the prompt (token ids) is nearest to."""
        if self.router is None:
            raise RoutingError(f"{AUTO!r} needs routing centroids and this server has none (a plain model, or an "
                               "export made before routing existed: export the run again); name a domain instead")
        return self.router.route(self.model, [prompt], self.model.cfg.bos_id)[0]

    def memory(self, domains: list[str | None]) -> RowMemory | None:
        """Per-row memory of a batch; rows of one batch either all use a domain or all use none."""
        return None if domains[0] is None else self.bank.rows(domains)


@dataclasses.dataclass(eq=False)
class Request:
    """One completion: prompt ids, its domain (None: the bare backbone), sampling, and where results go.

    `on_token(id)` gets every new token (EOS excluded); `on_finish(reason)` is called exactly
    once with "stop" (EOS), "length", "cancelled", or the exception that failed the batch.
    """

    prompt: list[int]
    domain: str | None
    sampling: SamplingConfig
    on_token: Callable[[int], None]
    on_finish: Callable[[str | Exception], None]
    cancelled: bool = False
    finished: bool = False

    def batch_key(self) -> tuple:
        """Requests with equal keys share compiled steps (the bucket ignores max_new_tokens; it only clamps)."""
        s = self.sampling
        sampling = (0.0,) if s.temperature == 0 else (s.temperature, s.top_k, s.seed)
        return self.domain is None, -(-len(self.prompt) // PROMPT_BUCKET), sampling


class Scheduler:
    """A bounded queue of `Request`s and the worker thread that batches and runs them (module docstring)."""

    def __init__(self, served: ServedModel, *, max_batch: int = 8, max_queue: int = 64, window_s: float = 0.005):
        if max_batch < 1 or max_queue < 1 or window_s < 0:
            raise ValueError(f"need max_batch >= 1, max_queue >= 1, window_s >= 0; got {max_batch}, {max_queue}, "
                             f"{window_s}")
        self.served, self.max_batch, self.max_queue, self.window_s = served, max_batch, max_queue, window_s
        self._pending: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition(threading.RLock())  # _finish re-enters it
        self._draining = self._stopping = False
        self._thread: threading.Thread | None = None
        self.counts = collections.Counter(dict.fromkeys(
            ("batches", "rows", "completed", "cancelled", "failed", "rejected"), 0))
        self.running = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="sparsemem-scheduler", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        with self._cond:
            if self._draining:
                raise DrainingError("the server is shutting down and accepts no new requests; retry on another "
                                    "replica or after restart")
            if len(self._pending) >= self.max_queue:
                self.counts["rejected"] += 1
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry later")
            self._pending.append(request)
            self._cond.notify()

    def cancel(self, request: Request) -> None:
        """Stop working on `request` (no-op once finished): dropped from the queue, or its row stops emitting."""
        with self._cond:
            request.cancelled = True
            if request in self._pending:
                self._pending.remove(request)
                self._finish(request, "cancelled")

    def drain(self) -> None:
        """Refuse new requests; queued and running ones still complete."""
        with self._cond:
            self._draining = True

    def stop(self) -> None:
        """Finish the running batch, fail what is still queued, and end the worker."""
        with self._cond:
            self._draining = self._stopping = True
            while self._pending:
                self._finish(self._pending.popleft(), DrainingError("the server stopped before running this request"))
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"queued": len(self._pending), "running": self.running, **self.counts}

    def _finish(self, request: Request, reason: str | Exception) -> None:
        with self._cond:
            if request.finished:
                return
            request.finished = True
            self.counts["cancelled" if reason == "cancelled" else "failed" if isinstance(reason, Exception)
                        else "completed"] += 1
        _call(request.on_finish, reason)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._pending:
                    return
            time.sleep(self.window_s)  # let concurrent requests arrive and join this batch
            with self._cond:
                batch = self._take_batch()
                self.running = len(batch)
            if batch:
                self._run(batch)
            with self._cond:
                self.running = 0

    def _take_batch(self) -> list[Request]:
        """The oldest request and the queued ones that share its key, in arrival order, up to `max_batch`."""
        if not self._pending:
            return []
        key = self._pending[0].batch_key()
        batch = [r for r in self._pending if r.batch_key() == key][: self.max_batch]
        for r in batch:
            self._pending.remove(r)
        return batch

    def _run(self, batch: list[Request]) -> None:
        cfg = self.served.model.cfg
        rows = min(1 << (len(batch) - 1).bit_length(), max(self.max_batch, len(batch)))
        prompts = [r.prompt for r in batch] + [batch[0].prompt] * (rows - len(batch))
        domains = [r.domain for r in batch] + [batch[0].domain] * (rows - len(batch))
        longest, needed = max(map(len, prompts)), max(r.sampling.max_new_tokens for r in batch)
        rounded = -(-needed // PROMPT_BUCKET) * PROMPT_BUCKET
        new_tokens = max(needed, min(rounded, cfg.max_seq_len - bucket_length(longest, 0, cfg.max_seq_len)))
        sampling = dataclasses.replace(batch[0].sampling, max_new_tokens=new_tokens)
        with self._cond:
            self.counts["batches"] += 1
            self.counts["rows"] += len(batch)
        emitted = [0] * len(batch)
        try:
            steps = decode_steps(self.served.model, prompts, sampling, pad_id=cfg.pad_id,
                                 memory=self.served.memory(domains))
            for ids in steps:
                for i, request in enumerate(batch):
                    if request.finished:
                        continue
                    if request.cancelled:
                        self._finish(request, "cancelled")
                    elif int(ids[i]) == cfg.eos_id:
                        self._finish(request, "stop")
                    else:
                        _call(request.on_token, int(ids[i]))
                        emitted[i] += 1
                        if emitted[i] == request.sampling.max_new_tokens:
                            self._finish(request, "length")
                if all(r.finished for r in batch):
                    break
            steps.close()
        except Exception as err:  # noqa: BLE001 - every accepted request must get an answer
            log.exception("batch of %d rows failed", len(batch))
            for request in batch:
                self._finish(request, err)


def _call(callback: Callable, value) -> None:
    """Run a request's callback; its failure (e.g. its event loop closed) must not stop the worker."""
    try:
        callback(value)
    except Exception:  # noqa: BLE001
        log.exception("request callback failed")
