"""The OpenAI request bodies the server accepts, validated into `CompletionParams`.

`/v1/completions` and `/v1/chat/completions` take the fields OpenAI defines that this
server implements; a field it defines but this server does not implement is accepted
only at its neutral value (e.g. `frequency_penalty: 0`), anything else, and any unknown
field, is a 400 naming it. Numbers must be finite and in range; a prompt is a string,
a list of strings, a list of token ids or a list of token-id lists (one choice each).
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets

from sparsemem.serve.chat import ChatTemplateError
from sparsemem.serve.sampling import TOP_LOGPROBS, SamplingConfig

MAX_PROMPTS = 32  # prompts per request
MAX_STOPS = 4
COMMON_FIELDS = frozenset({"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
                           "stream_options", "n", "user"})
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "logprobs", "echo", "best_of"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "suffix": "",
           "response_format": {"type": "text"}, "tools": [], "parallel_tool_calls": True, "store": False}


class ApiError(Exception):
    """An error answered with `status` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
                504: "timeout_error"}.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


@dataclasses.dataclass(frozen=True)
class CompletionParams:
    """A validated request: one choice per prompt (`prompts`: token ids and the text they came from)."""

    model: str
    prompts: tuple[tuple[tuple[int, ...], str], ...]
    domain: str | None
    sampling: SamplingConfig
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    echo: bool = False
    chat: bool = False


def field(body: dict, name: str, kinds: tuple[type, ...], default, what: str):
    """`body[name]` checked against `kinds` (a bool is not a number here, numbers are finite); absent or null
    gives `default`."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds) or not _finite(value):
        raise ApiError(400, f"{name!r} must be {what}, got {json.dumps(value)[:80]}", name)
    return value


def _finite(value) -> bool:
    """False for NaN, infinities and integers too large for a float."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return math.isfinite(float(value))
        except OverflowError:
            return False
    return True


def check_fields(body, allowed: frozenset[str]) -> None:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    for name, value in body.items():
        if name in allowed or value is None or (name in NEUTRAL and value == NEUTRAL[name]
                                                 and type(value) is type(NEUTRAL[name])):
            continue
        what = "is not supported by this server" if name in NEUTRAL else "is not a field this endpoint knows"
        raise ApiError(400, f"{name!r} {what}; remove it (supported: {', '.join(sorted(allowed))})", name)


def _sampling(body: dict, served, max_tokens_field: str, logprobs: int | None) -> SamplingConfig:
    max_tokens = field(body, max_tokens_field, (int,), 16, "an integer >= 1")
    temperature = field(body, "temperature", (int, float), 1.0, "a finite number >= 0 (0 = greedy)")
    top_p = field(body, "top_p", (int, float), 1.0, "a number in (0, 1]")
    top_k = field(body, "top_k", (int,), None, "an integer >= 1 (or -1/null for all tokens)")
    seed = field(body, "seed", (int,), None, "an integer in [0, 2**64)")
    for name in ("n", "best_of"):
        if field(body, name, (int,), 1, "an integer") != 1:
            raise ApiError(400, f"{name!r} must be 1: one completion per prompt", name)
    if top_k is not None and top_k > served.model.cfg.vocab_size:
        raise ApiError(400, f"'top_k' must be at most the vocabulary size {served.model.cfg.vocab_size}, got "
                            f"{top_k}", "top_k")
    try:
        return SamplingConfig(max_new_tokens=max_tokens, temperature=float(temperature),
                              top_k=None if top_k in (None, -1) else top_k, top_p=float(top_p),
                              seed=secrets.randbits(64) if seed is None else seed, logprobs=logprobs)
    except ValueError as err:
        message = str(err).replace("max_new_tokens", max_tokens_field)
        raise ApiError(400, message, message.split()[0]) from None


def _common(body: dict, served) -> tuple[str, tuple[str, ...], bool, bool]:
    model = field(body, "model", (str,), None, "a string")
    if model is None:
        raise ApiError(400, "'model' is required: a domain name or the backbone's name (GET /v1/models)", "model")
    stop = field(body, "stop", (str, list), None, "a string or a list of strings")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOPS}, got "
                            f"{json.dumps(stop)}", "stop")
    stream = field(body, "stream", (bool,), False, "true or false")
    options = field(body, "stream_options", (dict,), None, 'an object like {"include_usage": true}') or {}
    include_usage = field(options, "include_usage", (bool,), False, "true or false")
    field(body, "user", (str,), None, "a string")
    return model, stops, stream, include_usage


def _prompts(prompt, served) -> list[tuple[tuple[int, ...], str]]:
    """`prompt` in any of OpenAI's four forms as (token ids, text) pairs."""
    tokenizer, vocab = served.tokenizer, served.model.cfg.vocab_size
    forms = "a string, a list of strings, a list of token ids or a list of token-id lists"
    if prompt is None:
        raise ApiError(400, f"'prompt' is required: {forms}", "prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(400, f"'prompt' must be {forms}, got {json.dumps(prompt)[:80]}", "prompt")
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        prompt = [prompt]
    if len(prompt) > MAX_PROMPTS:
        raise ApiError(400, f"'prompt' holds {len(prompt)} prompts; send at most {MAX_PROMPTS} per request", "prompt")
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append((encode(tokenizer, p, "prompt"), p))
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if not all(0 <= t < vocab for t in p):
                raise ApiError(400, f"'prompt' token ids must be in [0, {vocab}), got {json.dumps(p)[:80]}", "prompt")
            out.append((tuple(p), tokenizer.decode(p)))
        else:
            raise ApiError(400, f"'prompt' must be {forms}, got {json.dumps(prompt)[:80]}", "prompt")
    return out


def encode(tokenizer, text: str, name: str, add_bos: bool = True) -> tuple[int, ...]:
    """`text`'s token ids; text the tokenizer cannot take (e.g. lone surrogates from JSON escapes) is a 400."""
    try:
        return tuple(tokenizer.encode(text, add_bos=add_bos))
    except Exception as err:  # noqa: BLE001 - the tokenizers library raises several types for bad text
        raise ApiError(400, f"{name!r} holds text the tokenizer cannot encode ({type(err).__name__}); send valid "
                            "Unicode", name) from None


def _checked(params: CompletionParams, context: int) -> CompletionParams:
    for ids, _ in params.prompts:
        if not ids:
            raise ApiError(400, "'prompt' is empty and this tokenizer adds no BOS token; send some text", "prompt")
        if len(ids) + params.sampling.max_new_tokens > context:
            raise ApiError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({params.sampling.max_new_tokens}) "
                                f"exceeds this server's context of {context} tokens; shorten the prompt or ask for "
                                "fewer tokens", "prompt")
    return params


def parse_completion(body, served, context: int, resolve) -> CompletionParams:
    """Validate a `/v1/completions` body; `resolve(model)` gives the domain a model id names."""
    check_fields(body, COMPLETION_FIELDS)
    model, stops, stream, include_usage = _common(body, served)
    logprobs = field(body, "logprobs", (int,), None, f"an integer in [0, {TOP_LOGPROBS}]")
    echo = field(body, "echo", (bool,), False, "true or false")
    if echo and logprobs is not None:
        raise ApiError(400, "'echo' with 'logprobs' is not supported (prompt log-probabilities are not computed); "
                            "drop one of them", "echo")
    sampling = _sampling(body, served, "max_tokens", logprobs)
    domain = resolve(model)
    prompts = tuple(_prompts(body.get("prompt"), served))
    return _checked(CompletionParams(model, prompts, domain, sampling, stops, stream, include_usage, echo), context)


def _messages(messages) -> list[dict]:
    """`messages` as the template expects them: role and text content (text parts joined)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' is required: a non-empty list of {\"role\": ..., \"content\": ...}",
                       "messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"'{where}' must be an object with a string 'role'", "messages")
        unknown = set(message) - {"role", "content", "name"}
        if unknown:
            raise ApiError(400, f"'{where}' has unsupported keys {sorted(unknown)} (only role, content, name)",
                           "messages")
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"'{where}.content' parts must all be {{\"type\": \"text\", \"text\": ...}}; "
                                    "this server reads text only", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"'{where}.content' must be a string or a list of text parts", "messages")
        out.append({"role": message["role"], "content": content})
    return out


def parse_chat(body, served, context: int, resolve) -> CompletionParams:
    """Validate a `/v1/chat/completions` body and render its messages with the model's chat template."""
    check_fields(body, CHAT_FIELDS)
    model, stops, stream, include_usage = _common(body, served)
    want = field(body, "logprobs", (bool,), False, "true or false")
    top = field(body, "top_logprobs", (int,), None, f"an integer in [0, {TOP_LOGPROBS}]")
    if top is not None and not want:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    sampling = _sampling(body, served, limit, (top or 0) if want else None)
    domain = resolve(model)
    messages = _messages(body.get("messages"))
    if served.chat is None:
        raise ApiError(400, f"model {model!r} has no chat template (no 'chat_template' in tokenizer_config.json "
                            "and no chat_template.jinja next to its tokenizer.json); use /v1/completions with a "
                            "prompt you format yourself", "messages")
    try:
        text = served.chat.render(messages)
    except ChatTemplateError as err:
        raise ApiError(400, str(err), "messages") from None
    ids = encode(served.tokenizer, text, "messages", add_bos=False)
    return _checked(CompletionParams(model, ((ids, text),), domain, sampling, stops, stream, include_usage,
                                     chat=True), context)
