"""Cross-request batching for the HTTP server: one worker thread runs every model step.

Requests wait in a bounded FIFO queue (`QueueFullError` when full, `DeadlineError` when
a request outlives its deadline). Two workers share the queue, the request bookkeeping
and the metrics (`Scheduler`):

- `ContinuousScheduler` (the server's default): a fixed set of decode slots
  (`sparsemem.serve.slots`); waiting requests of one prompt bucket are prefilled
  together into free slots and join the running decode at the next step, a finished row
  leaves at once, and one step serves every slot whatever its domain or sampling
  settings.
- `StaticScheduler`: batches the oldest request with the queued ones of its prompt
  bucket (memory or bare backbone) after a short window, and runs the batch until every
  row is done; newcomers wait for the next batch. Its batch row count is padded up to a
  power of two and its decode length up to a multiple of `PROMPT_BUCKET` to bound
  recompiles. Kept as the baseline `benchmarks/serve_load.py` measures against.

A row ends at EOS, at its own `max_new_tokens`, when cancelled (client gone, stop string
seen) or past its deadline. Callbacks run on the worker thread; the server hands them on
to its event loop.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import pathlib
import threading
import time
from typing import Callable

import numpy as np

from sparsemem.checkpoints.hf import load_hf_checkpoint, load_tokenizer
from sparsemem.serve.chat import ChatTemplate, load_chat_template
from sparsemem.serve.compact_decoder import CompactDecoder, RowMemory
from sparsemem.serve.compaction import CompactLayout, compact_decoder
from sparsemem.serve.deploy import AUTO, Deployment
from sparsemem.serve.generate import PROMPT_BUCKET, bucket_length, decode_steps
from sparsemem.serve.memory import MemoryBank
from sparsemem.serve.metrics import Metrics
from sparsemem.serve.routing import CentroidRouter, RoutingError
from sparsemem.serve.sampling import Picked, SamplingConfig, SamplingRows
from sparsemem.serve.slots import IDLE, PREFILL_ROWS, SlotEngine
from sparsemem.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The request queue is full; the client should retry later."""


class DrainingError(RuntimeError):
    """The server is shutting down and accepts no new requests."""


class DeadlineError(RuntimeError):
    """A request did not finish before its deadline."""


@dataclasses.dataclass
class ServedModel:
    """What a server runs: a backbone (compacted, or a plain model with every unit kept), its tokenizer and chat
    template (if the model has one) and, for an export, its domains' memory and the router that picks a domain for
    `model: "auto"`."""

    name: str
    model: CompactDecoder
    tokenizer: Tokenizer
    bank: MemoryBank | None = None
    router: CentroidRouter | None = None
    chat: ChatTemplate | None = None

    @classmethod
    def from_export(cls, path: str | pathlib.Path, *, offload: bool = False, name: str = "backbone") -> "ServedModel":
        deployment = Deployment.load(path, offload=offload)
        if deployment.tokenizer is None:
            raise FileNotFoundError(f"{path}/backbone has no tokenizer.json; the server needs one to read text "
                                    "prompts (export the run again from a model folder with a tokenizer)")
        return cls(name, deployment.backbone.model, deployment.tokenizer, deployment.bank, deployment.router,
                   _chat_template(pathlib.Path(path) / "backbone", deployment.tokenizer))

    @classmethod
    def from_hf(cls, folder: str | pathlib.Path, name: str | None = None) -> "ServedModel":
        """A plain model folder, in the serving engine's layout (every unit kept, no domains)."""
        decoder = load_hf_checkpoint(folder)
        model = compact_decoder(decoder, CompactLayout.full(decoder.cfg))
        tokenizer = load_tokenizer(folder, decoder.cfg)
        return cls(name or pathlib.Path(folder).name, model, tokenizer, chat=_chat_template(folder, tokenizer))

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


def _chat_template(folder: pathlib.Path, tokenizer: Tokenizer) -> ChatTemplate | None:
    source = load_chat_template(folder)
    if source is None:
        return None
    special = [tokenizer.decode([i], skip_special_tokens=False) if i is not None else ""
               for i in (tokenizer.bos_id, tokenizer.eos_id)]
    return ChatTemplate(source, bos_token=special[0], eos_token=special[1])


@dataclasses.dataclass(frozen=True)
class Token:
    """One generated token, its log-probability, and the request's `logprobs` likeliest alternatives."""

    id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(eq=False)
class Request:
    """One completion: prompt ids, its domain (None: the bare backbone), sampling, and where results go.

    `on_token(Token)` gets every new token (EOS excluded); `on_finish(reason)` is called exactly
    once with "stop" (EOS), "length", "cancelled", or the exception that ended it.
    `deadline` is a `time.monotonic()` time (None: no deadline).
    """

    prompt: list[int]
    domain: str | None
    sampling: SamplingConfig
    on_token: Callable[[Token], None]
    on_finish: Callable[[str | Exception], None]
    deadline: float | None = None
    cancelled: bool = False
    finished: bool = False
    emitted: int = 0
    submitted: float = 0.0
    last_token: float | None = None

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline


class Scheduler:
    """The bounded queue, request bookkeeping and worker thread both batchers share (module docstring)."""

    def __init__(self, served: ServedModel, *, max_batch: int = 8, max_queue: int = 64):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"need max_batch >= 1 and max_queue >= 1; got {max_batch}, {max_queue}")
        self.served, self.max_batch, self.max_queue = served, max_batch, max_queue
        self._pending: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition(threading.RLock())  # _finish re-enters it
        self._draining = self._stopping = False
        self._thread: threading.Thread | None = None
        self.metrics = Metrics()
        self.running = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._guarded_work, name="sparsemem-scheduler", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (False before `start` and after it died or stopped)."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, request: Request) -> None:
        with self._cond:
            if self._draining:
                raise DrainingError("the server is shutting down and accepts no new requests; retry on another "
                                    "replica or after restart")
            if len(self._pending) >= self.max_queue:
                self.metrics.count("rejected")
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry later")
            request.submitted = time.monotonic()
            self.metrics.prompt_tokens += len(request.prompt)
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
        """Finish the running rows, fail what is still queued, and end the worker."""
        with self._cond:
            self._draining = self._stopping = True
            while self._pending:
                self._finish(self._pending.popleft(), DrainingError("the server stopped before running this request"))
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"queued": len(self._pending), "running": self.running, **self.metrics.outcomes}

    def prometheus(self) -> str:
        """The metrics in Prometheus' text format."""
        with self._cond:
            return self.metrics.render(queued=len(self._pending), running=self.running)

    def _guarded_work(self) -> None:
        try:
            self._work()
        except Exception as err:  # noqa: BLE001 - the loop died: answer everyone; /health reports it (not alive)
            log.exception("the decode loop died")
            self.drain()
            with self._cond:
                while self._pending:
                    self._finish(self._pending.popleft(), err)

    def _work(self) -> None:
        raise NotImplementedError

    def _wait_for_work(self, busy: bool) -> bool:
        """Block until a request waits (or `busy`); drop queued requests past their deadline. False: stop."""
        with self._cond:
            while not self._pending and not busy and not self._stopping:
                self._cond.wait()
            now = time.monotonic()
            for request in [r for r in self._pending if r.expired(now)]:
                self._pending.remove(request)
                self._expire(request)
            return busy or bool(self._pending) or not self._stopping

    def _expire(self, request: Request) -> None:
        self._finish(request, DeadlineError(f"the request did not finish within its deadline "
                                            f"({request.deadline - request.submitted:.0f} s); ask for fewer tokens "
                                            "or retry when the server is less busy"))

    def _finish(self, request: Request, reason: str | Exception) -> None:
        with self._cond:
            if request.finished:
                return
            request.finished = True
            outcome = ("cancelled" if reason == "cancelled" else "timed_out" if isinstance(reason, DeadlineError)
                       else "failed" if isinstance(reason, Exception) else "completed")
            self.metrics.finished(outcome, time.monotonic() - request.submitted)
        _call(request.on_finish, reason)

    def _emit(self, request: Request, picked: Picked, row: int) -> None:
        """Hand `request` its next token, row `row` of `picked`, or end it (cancelled, expired, EOS, length)."""
        if request.finished:
            return
        now = time.monotonic()
        token = int(picked.ids[row])
        if request.cancelled:
            self._finish(request, "cancelled")
        elif request.expired(now):
            self._expire(request)
        elif token == self.served.model.cfg.eos_id:
            self._finish(request, "stop")
        else:
            n = request.sampling.logprobs or 0
            top = tuple(zip(picked.top_ids[row, :n].tolist(), picked.top_logprobs[row, :n].tolist()))
            with self._cond:
                self.metrics.token(now - (request.last_token or request.submitted), first=request.last_token is None)
            request.last_token = now
            _call(request.on_token, Token(token, float(picked.logprob[row]), top))
            request.emitted += 1
            if request.emitted == request.sampling.max_new_tokens:
                self._finish(request, "length")


class StaticScheduler(Scheduler):
    """Batches of queued requests run to the end before the next batch starts (module docstring)."""

    def __init__(self, served: ServedModel, *, max_batch: int = 8, max_queue: int = 64, window_s: float = 0.005):
        super().__init__(served, max_batch=max_batch, max_queue=max_queue)
        if window_s < 0:
            raise ValueError(f"need window_s >= 0, got {window_s}")
        self.window_s = window_s

    def _work(self) -> None:
        while self._wait_for_work(busy=False):
            time.sleep(self.window_s)  # let concurrent requests arrive and join this batch
            with self._cond:
                batch = self._take_batch()
                self.running = len(batch)
            if batch:
                self._run(batch)
            with self._cond:
                self.running = 0

    def _take_batch(self) -> list[Request]:
        """The oldest request and the queued ones of its prompt bucket and kind, in arrival order, up to `max_batch`."""
        if not self._pending:
            return []

        def key(r: Request) -> tuple:
            return r.domain is None, prompt_bucket(r)

        batch = [r for r in self._pending if key(r) == key(self._pending[0])][: self.max_batch]
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
        sampling = [r.sampling for r in batch] + [batch[0].sampling] * (rows - len(batch))
        with self._cond:
            self.metrics.count("batches")
        try:
            steps = decode_steps(self.served.model, prompts, sampling, pad_id=cfg.pad_id,
                                 memory=self.served.memory(domains), steps=new_tokens)
            for picked in steps:
                for i, request in enumerate(batch):
                    self._emit(request, picked, i)
                if all(r.finished for r in batch):
                    break
            steps.close()
        except Exception as err:  # noqa: BLE001 - every accepted request must get an answer
            log.exception("batch of %d rows failed", len(batch))
            for request in batch:
                self._finish(request, err)


class ContinuousScheduler(Scheduler):
    """`max_batch` decode slots that requests join and leave at every step (module docstring).

    `context`: the longest prompt + max_tokens a request may have (the slots' cache length).
    """

    def __init__(self, served: ServedModel, *, context: int, max_batch: int = 8, max_queue: int = 64):
        super().__init__(served, max_batch=max_batch, max_queue=max_queue)
        self.context = context

    def _work(self) -> None:
        engine = SlotEngine(self.served.model, self.served.bank, self.max_batch, self.context)
        slots = self.max_batch
        active: dict[int, Request] = {}  # always slots 0..len(active)-1 (`_compact`)
        tokens, steps = np.zeros(slots, np.int32), np.zeros(slots, np.int32)
        settings = SamplingRows.of([IDLE] * slots)
        engine.warm_up()
        while self._wait_for_work(busy=bool(active)):
            while len(active) < slots:  # every waiting request that fits joins before the next step
                with self._cond:
                    group = self._take_group(slots - len(active))
                    self.running = len(active) + len(group)
                if not group:
                    break
                self._admit(engine, active, group, tokens, steps, settings)
            if active:
                self._decode(engine, active, tokens, steps, settings)
            with self._cond:
                self.running = len(active)

    def _take_group(self, free: int) -> list[Request]:
        """The oldest waiting request and the queued ones of its prompt bucket, in arrival order, up to `free` and
        `PREFILL_ROWS` (one prefill: rows of one bucket compute what they would alone)."""
        if not self._pending:
            return []
        bucket = prompt_bucket(self._pending[0])
        group = [r for r in self._pending if prompt_bucket(r) == bucket][:min(free, PREFILL_ROWS)]
        for request in group:
            self._pending.remove(request)
        return group

    def _admit(self, engine: SlotEngine, active: dict[int, Request], group: list[Request], tokens: np.ndarray,
               steps: np.ndarray, settings: SamplingRows) -> None:
        """Prefill `group` into the first free slots; a request stays in its slot unless its first token ends it."""
        first = len(active)
        try:
            picked = engine.admit(list(range(first, first + len(group))), [r.prompt for r in group],
                                  [r.domain for r in group], [r.sampling for r in group],
                                  self.served.model.cfg.pad_id)
        except Exception as err:  # noqa: BLE001 - these requests fail, the others go on
            log.exception("prefill of %d rows failed", len(group))
            for request in group:
                self._finish(request, err)
            return
        for row, request in enumerate(group):
            self._emit(request, picked, row)
            if not request.finished:
                slot = first + row
                active[slot], tokens[slot], steps[slot] = request, picked.ids[row], 1
                settings.set_row(slot, request.sampling)
        self._compact(engine, active, tokens, steps, settings)

    def _decode(self, engine: SlotEngine, active: dict[int, Request], tokens: np.ndarray, steps: np.ndarray,
                settings: SamplingRows) -> None:
        """One decode step of every busy slot; rows that finish leave their slot (`_compact`)."""
        with self._cond:
            self.metrics.count("batches")
        try:
            picked = engine.step(tokens, settings, steps, busy=len(active))
        except Exception as err:  # noqa: BLE001 - the slots' state is lost: fail their requests, start empty
            log.exception("decode step of %d rows failed", len(active))
            for request in active.values():
                self._finish(request, err)
            picked = None
            engine.reset()
        for slot, request in list(active.items()):
            if picked is not None:
                self._emit(request, picked, slot)
                tokens[slot], steps[slot] = picked.ids[slot], steps[slot] + 1
            if request.finished:
                del active[slot]
                settings.set_row(slot, IDLE)
        self._compact(engine, active, tokens, steps, settings)

    @staticmethod
    def _compact(engine: SlotEngine, active: dict[int, Request], tokens: np.ndarray, steps: np.ndarray,
                 settings: SamplingRows) -> None:
        """Move the highest busy slots into the free ones below them, so the busy slots are 0..len(active)-1 and
        a step decodes about as many rows as there are requests, not up to the highest busy slot."""
        for target in sorted(set(range(len(active))) - set(active)):
            source = max(active)
            engine.move(source, target)
            active[target] = active.pop(source)
            tokens[target], steps[target] = tokens[source], steps[source]
            settings.set_row(target, active[target].sampling)
            settings.set_row(source, IDLE)


def prompt_bucket(request: Request) -> int:
    """Which multiple of `PROMPT_BUCKET` the request's prompt is padded to."""
    return -(-len(request.prompt) // PROMPT_BUCKET)


def _call(callback: Callable, value) -> None:
    """Run a request's callback; its failure (e.g. its event loop closed) must not stop the worker."""
    try:
        callback(value)
    except Exception:  # noqa: BLE001
        log.exception("request callback failed")
