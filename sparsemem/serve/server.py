"""OpenAI-compatible HTTP API over a `Scheduler` (aiohttp): completions, chat, models, health, metrics.

`POST /v1/completions` and `POST /v1/chat/completions` take `model` (a domain, the
backbone's name for no memory, as vLLM's multi-LoRA serving names adapters, or `auto`:
the domain whose routing centroid the prompt is nearest to, named in the reply's
`model`) and the fields `sparsemem.serve.openai_api` validates: `max_tokens`,
`temperature`, `top_p`, `top_k`, `seed`, `stop`, `logprobs`, `echo`, `stream`
(server-sent events, `stream_options.include_usage`). Chat renders `messages` with the
model's chat template. `GET /v1/models[/{id}]` lists the backbone and its domains,
`GET /health` answers 503 once the decode loop is dead, `GET /metrics` is Prometheus text.
Bad input is a 4xx in OpenAI's error shape naming the field; a full queue is a 429, a
request past `request_timeout_s` a 504; a client that disconnects cancels its request
(`handler_cancellation`), freeing its slot.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid

from aiohttp import web

from sparsemem.serve.deploy import AUTO
from sparsemem.serve.openai_api import ApiError, CompletionParams, parse_chat, parse_completion
from sparsemem.serve.routing import RoutingError
from sparsemem.serve.scheduler import (DeadlineError, DrainingError, QueueFullError, Request, Scheduler, ServedModel,
                                       Token)


def resolver(served: ServedModel):
    """`model` id -> the domain it names (None: the bare backbone; `AUTO`: routed from the prompt later)."""
    def resolve(model: str) -> str | None:
        if model == served.name:
            return None
        if model in served.domains or model == AUTO and served.domains:
            return model
        raise ApiError(404, f"model {model!r} does not exist; available: {', '.join(model_ids(served))} "
                            "(GET /v1/models lists them)", "model")
    return resolve


def model_ids(served: ServedModel) -> tuple[str, ...]:
    return (served.name,) + served.domains + ((AUTO,) if served.router else ())


async def route(params: CompletionParams, served: ServedModel) -> list[str | None]:
    """Each prompt's domain; `model: "auto"` routes every prompt to its nearest domain (off the event loop)."""
    if params.domain != AUTO:
        return [params.domain] * len(params.prompts)
    try:
        return [await asyncio.to_thread(served.route, list(ids)) for ids, _ in params.prompts]
    except RoutingError as err:
        raise ApiError(400, str(err), "model") from None


class TextStream:
    """Token ids -> text deltas, cut at the first stop string; the deltas join to `decode(ids)` up to the stop.

    A delta is held back while the text ends in an incomplete character or could still
    become a stop string.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop, self.ids, self.sent = tokenizer, stop, [], ""
        self.hold = max(map(len, stop), default=1) - 1
        self.stopped = False

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


class Choice:
    """One prompt's answer as it arrives: text (cut at stop strings), tokens, finish reason."""

    def __init__(self, index: int, tokenizer, stop: tuple[str, ...]):
        self.index, self.text, self.tokens, self.unsent = index, TextStream(tokenizer, stop), [], []
        self.content, self.reason = "", None

    def take(self) -> list[Token]:
        """The tokens not yet reported with a delta."""
        tokens, self.unsent = self.unsent, []
        return tokens


class Generation:
    """Every prompt of `params` submitted to the scheduler (a full queue or a draining server raises `ApiError`
    here, before any response starts); `events()` yields `(choice, text delta, tokens)` as text arrives, and once
    per choice when it ends (then `choice.reason` is set). `close()` cancels whatever is still running."""

    def __init__(self, params: CompletionParams, domains: list[str | None], scheduler: Scheduler,
                 timeout_s: float | None):
        self.scheduler, self.loop, self.queue = scheduler, asyncio.get_running_loop(), asyncio.Queue()
        self.choices = [Choice(i, scheduler.served.tokenizer, params.stop) for i in range(len(params.prompts))]
        deadline = time.monotonic() + timeout_s if timeout_s else None
        self.jobs = []
        try:
            for i, ((ids, _), domain) in enumerate(zip(params.prompts, domains)):
                self.jobs.append(Request(list(ids), domain, params.sampling, lambda t, i=i: self._put(i, "token", t),
                                         lambda r, i=i: self._put(i, "end", r), deadline=deadline))
                scheduler.submit(self.jobs[-1])
        except (QueueFullError, DrainingError) as err:
            self.close()
            raise ApiError(429 if isinstance(err, QueueFullError) else 503, str(err)) from None

    def _put(self, *item) -> None:  # on the scheduler's thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def close(self) -> None:
        for job in self.jobs:
            self.scheduler.cancel(job)  # client gone, stop string seen or an error: free the slots

    async def events(self):
        running = len(self.choices)
        while running:
            i, kind, value = await self.queue.get()
            choice = self.choices[i]
            if choice.reason is not None:
                continue
            if kind == "end":
                if isinstance(value, DeadlineError):
                    raise ApiError(504, str(value))
                if isinstance(value, Exception):
                    raise ApiError(503 if isinstance(value, DrainingError) else 500, f"generation failed: {value}")
                choice.reason, delta = value, choice.text.finish()
            else:
                choice.tokens.append(value)
                choice.unsent.append(value)
                delta = choice.text.add(value.id)
                if choice.text.stopped:
                    choice.reason = "stop"
                    self.scheduler.cancel(self.jobs[i])  # free its slot now
                elif not delta:
                    continue
            running -= choice.reason is not None
            choice.content += delta
            yield choice, delta, choice.take()


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def completion_logprobs(tokens: list[Token], tokenizer, offset: int) -> dict:
    """OpenAI's legacy completions `logprobs` object for `tokens`, text offsets starting at `offset`."""
    texts = [_token_text(tokenizer, t.id) for t in tokens]
    offsets = [offset + sum(map(len, texts[:i])) for i in range(len(texts))]
    return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{_token_text(tokenizer, i): lp for i, lp in t.top} for t in tokens],
            "text_offset": offsets}


def chat_logprobs(tokens: list[Token], tokenizer) -> dict:
    """OpenAI's chat `logprobs` object for `tokens`."""
    def entry(token: int, logprob: float) -> dict:
        text = _token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
    return {"content": [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                        for t in tokens]}


class Reply:
    """Builds the response bodies of one request (completion or chat, whole or as stream chunks)."""

    def __init__(self, params: CompletionParams, model: str, tokenizer):
        self.params, self.model, self.tokenizer = params, model, tokenizer
        self.id = f"{'chatcmpl' if params.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.logprobs = params.sampling.logprobs is not None

    def _logprobs(self, tokens: list[Token], offset: int) -> dict | None:
        if not self.logprobs:
            return None
        if self.params.chat:
            return chat_logprobs(tokens, self.tokenizer)
        return completion_logprobs(tokens, self.tokenizer, offset)

    def usage(self, choices: list[Choice]) -> dict:
        prompt = sum(len(ids) for ids, _ in self.params.prompts)
        completion = sum(len(c.tokens) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _envelope(self, choices: list[dict], chunk: bool) -> dict:
        kind = ("chat.completion" if self.params.chat else "text_completion") + (".chunk" if chunk and
                                                                                  self.params.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, choices: list[Choice]) -> dict:
        out = []
        for c in choices:
            echo = self.params.prompts[c.index][1] if self.params.echo else ""
            body = {"index": c.index, "logprobs": self._logprobs(c.tokens, len(echo)), "finish_reason": c.reason}
            if self.params.chat:
                body["message"] = {"role": "assistant", "content": c.content}
            else:
                body["text"] = echo + c.content
            out.append(body)
        return {**self._envelope(out, chunk=False), "usage": self.usage(choices)}

    def chunk(self, index: int, delta: str, tokens: list[Token] = (), *, offset: int = 0, reason: str | None = None,
              first: bool = False) -> dict:
        """One stream event of choice `index`: a text delta (at `offset` in its text), its tokens, or the end."""
        body = {"index": index, "logprobs": self._logprobs(tokens, offset) if tokens else None,
                "finish_reason": reason}
        if self.params.chat:
            body["delta"] = {"role": "assistant", "content": delta} if first else ({"content": delta} if delta else {})
        else:
            body["text"] = delta
        return self._envelope([body], chunk=True)

    def usage_chunk(self, choices: list[Choice]) -> dict:
        return {**self._envelope([], chunk=True), "usage": self.usage(choices)}


def create_app(scheduler: Scheduler, *, context: int, request_timeout_s: float | None = None,
               api_keys: tuple[str, ...] = (), open_metrics: bool = False) -> web.Application:
    """The aiohttp application; starts the scheduler on startup, drains it on shutdown, stops it on cleanup.

    With `api_keys`, every `/v1/*` route (and `/metrics` unless `open_metrics`) needs
    `Authorization: Bearer <one of them>`; `/health` stays open.
    """
    served = scheduler.served
    resolve = resolver(served)
    app = web.Application(middlewares=[_errors_as_json] + ([_key_check(api_keys, open_metrics)] if api_keys else []))

    def handler(parse):
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                try:
                    body = await request.json()
                except (ValueError, RecursionError) as err:  # bad JSON, bad UTF-8, absurd nesting
                    raise ApiError(400, f"the request body is not valid JSON ({type(err).__name__}: {err}"[:200]
                                   + "); send a JSON object") from None
                params = parse(body, served, context, resolve)
                domains = await route(params, served)
                generation = Generation(params, domains, scheduler, request_timeout_s)
            except ApiError as err:
                return web.json_response(err.body(), status=err.status)
            model = domains[0] if params.domain == AUTO and len(set(domains)) == 1 else params.model
            try:
                reply = Reply(params, model, served.tokenizer)
                return await (_stream if params.stream else _whole)(request, params, reply, generation.events())
            finally:
                generation.close()
        return handle

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [_model_entry(served, m) for m in model_ids(served)]})

    async def model(request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name not in model_ids(served):
            raise ApiError(404, f"model {name!r} does not exist; available: {', '.join(model_ids(served))}", "model")
        return web.json_response(_model_entry(served, name))

    async def health(_: web.Request) -> web.Response:
        if not scheduler.alive:
            return web.json_response({"status": "decode loop stopped", **scheduler.stats()}, status=503)
        return web.json_response({"status": "ok", **scheduler.stats()})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=scheduler.prometheus(), content_type="text/plain", charset="utf-8",
                            headers={"X-Prometheus-Format": "0.0.4"})

    async def on_startup(_):
        scheduler.start()

    async def on_shutdown(_):  # runs before aiohttp waits for in-flight handlers: refuse new work, finish the rest
        scheduler.drain()

    async def on_cleanup(_):
        await asyncio.to_thread(scheduler.stop)

    app.router.add_post("/v1/completions", handler(parse_completion))
    app.router.add_post("/v1/chat/completions", handler(parse_chat))
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model}", model)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


def _model_entry(served: ServedModel, name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "sparsemem", "root": name,
            "parent": None if name == served.name else served.name}


def _key_check(api_keys: tuple[str, ...], open_metrics: bool):
    """Middleware refusing requests without a valid key with 401; compares in constant time against every key."""
    keys = [key.encode() for key in api_keys]

    @web.middleware
    async def check(request: web.Request, handler):
        guarded = request.path.startswith("/v1/") or request.path == "/metrics" and not open_metrics
        if guarded:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            given = given.strip().encode()
            matches = [hmac.compare_digest(given, key) for key in keys]  # no early exit: time does not tell which
            if scheme.lower() != "bearer" or not any(matches):
                what = "a wrong API key" if given else "no API key"
                raise ApiError(401, f"this server needs an API key and the request had {what}; send the header "
                                    "'Authorization: Bearer <key>' (the openai client's api_key)")
        return await handler(request)
    return check


@web.middleware
async def _errors_as_json(request: web.Request, handler):
    """Every error in OpenAI's shape: `ApiError`s and aiohttp's own (unknown route, wrong method, body too large)."""
    try:
        return await handler(request)
    except ApiError as err:
        return web.json_response(err.body(), status=err.status)
    except web.HTTPException as err:
        if err.status < 400:
            raise
        return web.json_response(ApiError(err.status, f"{err.reason}: {request.method} {request.path}").body(),
                                 status=err.status, headers={k: v for k, v in err.headers.items()
                                                             if k.lower() == "allow"})


async def _whole(request: web.Request, params: CompletionParams, reply: Reply, answer) -> web.Response:
    choices = {}
    try:
        async for choice, _, _ in answer:
            choices[choice.index] = choice
    except ApiError as err:
        return web.json_response(err.body(), status=err.status)
    return web.json_response(reply.whole([choices[i] for i in sorted(choices)]))


async def _stream(request: web.Request, params: CompletionParams, reply: Reply, answer) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    choices: dict[int, Choice] = {}

    async def send(body):
        await response.write(f"data: {json.dumps(body)}\n\n".encode())

    try:
        if params.chat or params.echo:
            for i, (_, text) in enumerate(params.prompts):
                await send(reply.chunk(i, text if params.echo else "", first=True))
        async for choice, delta, tokens in answer:
            choices[choice.index] = choice
            if delta or tokens:
                await send(reply.chunk(choice.index, delta, tokens, offset=len(choice.content) - len(delta)))
            if choice.reason is not None:
                await send(reply.chunk(choice.index, "", reason=choice.reason))
        if params.include_usage:
            await send(reply.usage_chunk([choices[i] for i in sorted(choices)]))
    except ApiError as err:
        await send(err.body())
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


def run(scheduler: Scheduler, *, host: str, port: int, context: int, drain_timeout_s: float = 60.0, **options) -> None:
    """Serve until SIGINT/SIGTERM, then stop accepting, finish in-flight requests (up to `drain_timeout_s`), exit.

    `options` go to `create_app` (request timeout, API keys, open metrics)."""
    web.run_app(create_app(scheduler, context=context, **options), host=host, port=port,
                shutdown_timeout=drain_timeout_s, handler_cancellation=True, print=None)
