"""OpenAI-compatible HTTP API over a `Scheduler` (aiohttp): completions, models, health.

`POST /v1/completions` takes `model` (a domain, the backbone's name for no memory, as
vLLM's multi-LoRA serving names adapters, or `auto`: the domain whose routing centroid
the prompt is nearest to, named in the reply's `model`), `prompt`, `max_tokens`, `temperature`,
`top_k`, `seed`, `stop`, `stream` (server-sent events, `stream_options.include_usage`).
`GET /v1/models` lists the backbone and its domains; `GET /health` reports the queue.
Bad input is a 4xx whose message names the field and the fix; a full queue is a 429;
a client that disconnects cancels its request (`handler_cancellation`), freeing its row.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import uuid

from aiohttp import web

from sparsemem.serve.deploy import AUTO
from sparsemem.serve.generate import SamplingConfig
from sparsemem.serve.routing import RoutingError
from sparsemem.serve.scheduler import DrainingError, QueueFullError, Request, Scheduler, ServedModel


class ApiError(Exception):
    """An error answered with `status` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def response(self) -> web.Response:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return web.json_response({"error": {"message": self.message, "type": kind, "param": self.param,
                                            "code": self.status}}, status=self.status)


def resolve_domain(model: str, served: ServedModel) -> str | None:
    """The domain a request's `model` names (None: the bare backbone; `AUTO`: routed from the prompt later)."""
    if model == served.name:
        return None
    if model in served.domains or model == AUTO and served.domains:
        return model
    names = (served.name,) + served.domains + ((AUTO,) if served.router else ())
    raise ApiError(404, f"model {model!r} does not exist; available: {', '.join(names)} (GET /v1/models lists them)",
                   "model")


async def routed(params: CompletionParams, served: ServedModel) -> CompletionParams:
    """`params` with `model: "auto"` replaced by the domain its prompt routes to (a forward pass, off the loop)."""
    if params.domain != AUTO:
        return params
    try:
        domain = await asyncio.to_thread(served.route, params.prompt)
    except RoutingError as err:
        raise ApiError(400, str(err), "model") from None
    return dataclasses.replace(params, model=domain, domain=domain)


@dataclasses.dataclass(frozen=True)
class CompletionParams:
    model: str
    prompt: list[int]
    domain: str | None
    sampling: SamplingConfig
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _field(body: dict, name: str, kinds: tuple[type, ...], default, what: str):
    """`body[name]` checked against `kinds` (a bool is not a number here); absent or null gives `default`."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ApiError(400, f"{name!r} must be {what}, got {json.dumps(value)}", name)
    return value


def parse_completion(body, served: ServedModel, context: int) -> CompletionParams:
    """Validate a `/v1/completions` body against the served model and the server's context limit."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    model = _field(body, "model", (str,), None, "a string")
    if model is None:
        raise ApiError(400, "'model' is required: a domain name or the backbone's name (GET /v1/models)", "model")
    prompt = _field(body, "prompt", (str,), None, "a string")
    if prompt is None:
        raise ApiError(400, "'prompt' is required: the text to continue", "prompt")
    for name in ("n", "best_of"):
        if _field(body, name, (int,), 1, "an integer") != 1:
            raise ApiError(400, f"{name!r} must be 1: one completion per request", name)
    max_tokens = _field(body, "max_tokens", (int,), 16, "an integer >= 1")
    temperature = _field(body, "temperature", (int, float), 1.0, "a number >= 0 (0 = greedy)")
    top_k = _field(body, "top_k", (int,), None, "an integer >= 1 (or -1/null for all tokens)")
    seed = _field(body, "seed", (int,), 0, "an integer")
    stop = _field(body, "stop", (str, list), None, "a string or a list of strings")
    stream = _field(body, "stream", (bool,), False, "true or false")
    options = _field(body, "stream_options", (dict,), None, 'an object like {"include_usage": true}') or {}
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most 4, got {json.dumps(stop)}", "stop")
    try:
        sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=float(temperature),
                                  top_k=None if top_k in (None, -1) else top_k, seed=seed)
    except ValueError as err:
        raise ApiError(400, str(err).replace("max_new_tokens", "max_tokens")) from None
    if sampling.top_k is not None and sampling.top_k > served.model.cfg.vocab_size:
        raise ApiError(400, f"'top_k' must be at most the vocabulary size {served.model.cfg.vocab_size}, got "
                            f"{top_k}", "top_k")
    domain = resolve_domain(model, served)
    ids = served.tokenizer.encode(prompt)
    if not ids:
        raise ApiError(400, "'prompt' is empty and this tokenizer adds no BOS token; send some text", "prompt")
    if len(ids) + max_tokens > context:
        raise ApiError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds this server's "
                            f"context of {context} tokens; shorten the prompt or ask for fewer tokens", "prompt")
    return CompletionParams(model, ids, domain, sampling, stops, stream, bool(options.get("include_usage")))


class TextStream:
    """Token ids -> text deltas, cut at the first stop string; the deltas join to `decode(ids)` up to the stop.

    A delta is held back while the text ends in an incomplete character or could still
    become a stop string.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop, self.ids, self.sent = tokenizer, stop, [], ""
        self.hold = max(map(len, stop), default=1) - 1
        self.stopped = False
        self.reason: str | None = None  # finish_reason once the stream ended

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._delta(final=False)

    def finish(self) -> str:
        return "" if self.stopped else self._delta(final=True)

    def _delta(self, final: bool) -> str:
        text = self.tokenizer.decode(self.ids)
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            text, final, self.stopped = text[: min(cuts)], True, True
        if not text.startswith(self.sent) or (not final and text.endswith("\ufffd")):
            return ""
        end = len(text) if final else max(len(self.sent), len(text) - self.hold)
        delta, self.sent = text[len(self.sent):end], text[:end]
        return delta


class _Events:
    """Scheduler callbacks (worker thread) -> an asyncio queue of ("token", id) / ("end", reason)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def token(self, token: int) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ("token", token))

    def finish(self, reason) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ("end", reason))


def create_app(scheduler: Scheduler, *, context: int) -> web.Application:
    """The aiohttp application; starts the scheduler on startup, drains it on shutdown, stops it on cleanup."""
    served = scheduler.served
    app = web.Application()

    async def completions(request: web.Request) -> web.StreamResponse:
        try:
            try:
                body = await request.json()
            except ValueError as err:  # bad JSON or bad UTF-8
                raise ApiError(400, f"the request body is not valid JSON ({err}); send a JSON object") from None
            params = await routed(parse_completion(body, served, context), served)
            events = _Events(asyncio.get_running_loop())
            job = Request(params.prompt, params.domain, params.sampling, events.token, events.finish)
            try:
                scheduler.submit(job)
            except QueueFullError as err:
                raise ApiError(429, str(err)) from None
            except DrainingError as err:
                raise ApiError(503, str(err)) from None
        except ApiError as err:
            return err.response()
        try:
            reply = _stream if params.stream else _complete
            return await reply(request, params, events, served.tokenizer)
        finally:
            scheduler.cancel(job)  # client gone or stop string seen: free the row (no-op once finished)

    async def models(_: web.Request) -> web.Response:
        created = int(time.time())
        entries = [{"id": served.name, "object": "model", "created": created, "owned_by": "sparsemem",
                    "root": served.name, "parent": None}]
        entries += [{"id": d, "object": "model", "created": created, "owned_by": "sparsemem", "root": d,
                     "parent": served.name} for d in served.domains + ((AUTO,) if served.router else ())]
        return web.json_response({"object": "list", "data": entries})

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", **scheduler.stats()})

    async def on_startup(_):
        scheduler.start()

    async def on_shutdown(_):  # runs before aiohttp waits for in-flight handlers: refuse new work, finish the rest
        scheduler.drain()

    async def on_cleanup(_):
        await asyncio.to_thread(scheduler.stop)

    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


async def _deltas(events: _Events, text: TextStream):
    """Text deltas of the request's tokens until it ends (EOS, length or a stop string; then `text.reason` is set)."""
    while True:
        kind, value = await events.queue.get()
        if kind == "end":
            if isinstance(value, Exception):
                raise ApiError(500, f"generation failed: {value}")
            text.reason = value
            tail = text.finish()
            if tail:
                yield tail
            return
        delta = text.add(value)
        if delta:
            yield delta
        if text.stopped:
            text.reason = "stop"
            return  # the handler cancels the request, freeing its row


def _body(params: CompletionParams, cid: str, created: int, text: str, reason: str | None, usage: dict | None):
    body = {"id": cid, "object": "text_completion", "created": created, "model": params.model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}
    if usage is not None:
        body["usage"] = usage
    return body


def _usage(params: CompletionParams, text: TextStream) -> dict:
    n = len(text.ids)
    return {"prompt_tokens": len(params.prompt), "completion_tokens": n, "total_tokens": len(params.prompt) + n}


async def _complete(request: web.Request, params: CompletionParams, events: _Events, tokenizer) -> web.Response:
    text = TextStream(tokenizer, params.stop)
    try:
        out = "".join([d async for d in _deltas(events, text)])
    except ApiError as err:
        return err.response()
    return web.json_response(_body(params, f"cmpl-{uuid.uuid4().hex}", int(time.time()), out, text.reason,
                                   _usage(params, text)))


async def _stream(request: web.Request, params: CompletionParams, events: _Events,
                  tokenizer) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    text = TextStream(tokenizer, params.stop)

    async def send(body):
        await response.write(f"data: {json.dumps(body)}\n\n".encode())

    try:
        async for delta in _deltas(events, text):
            await send(_body(params, cid, created, delta, None, None))
        await send(_body(params, cid, created, "", text.reason, _usage(params, text) if params.include_usage
                         else None))
    except ApiError as err:
        await send({"error": {"message": err.message, "type": "server_error", "param": None, "code": err.status}})
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


class BackgroundServer:
    """Run the app on `host:port` (0: a free port) in a thread with its own event loop; for tests and benchmarks.

    `with BackgroundServer(app) as server:` then `server.url`; leaving the block shuts it
    down as SIGTERM does (drain, then stop).
    """

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0):
        self.app, self.host, self.port = app, host, port
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="sparsemem-http", daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        self.runner = web.AppRunner(self.app, handle_signals=False, handler_cancellation=True, shutdown_timeout=60)
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result()
        return self

    async def _start(self):
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port)
        await site.start()
        self.port = self.runner.addresses[0][1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


async def wait_until_healthy(session, url: str, timeout_s: float = 600, process=None) -> None:
    """Client side: poll `GET {url}/health` until it answers 200 (raises if `process` exits or time runs out)."""
    import aiohttp  # noqa: PLC0415 - the client half of aiohttp, only for callers that start servers

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server process exited with status {process.returncode}")
        try:
            async with session.get(f"{url}/health") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError(f"no healthy server on {url} after {timeout_s}s")


def run(scheduler: Scheduler, *, host: str, port: int, context: int, drain_timeout_s: float = 60.0) -> None:
    """Serve until SIGINT/SIGTERM, then stop accepting, finish in-flight requests (up to `drain_timeout_s`), exit."""
    web.run_app(create_app(scheduler, context=context), host=host, port=port, shutdown_timeout=drain_timeout_s,
                handler_cancellation=True, print=None)
