"""A server on a network: API keys (official client), no open non-loopback bind by accident, fuzzed endpoints."""

import http.client
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsemem import cli
from sparsemem.serve.openai_api import CHAT_FIELDS, COMPLETION_FIELDS, NEUTRAL
from sparsemem.serve.scheduler import ContinuousScheduler
from sparsemem.serve.server import BackgroundServer, create_app
from test_serve_http import CONTEXT, PROMPTS, export_dir, get, served  # noqa: F401 - fixtures

KEYS = ("key-one", "key-two")


@pytest.fixture(scope="module")
def server(served):  # noqa: F811
    scheduler = ContinuousScheduler(served, context=CONTEXT, max_batch=4, max_queue=64)
    with BackgroundServer(create_app(scheduler, context=CONTEXT, api_keys=KEYS)) as running:
        yield running


def request(server, method: str, path: str, body: bytes | None = None, key: str | None = KEYS[1]):
    """Status, body and whether it is an event stream, of one request; a hang fails the test (timeout)."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=60)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read(), response.getheader("Content-Type", "").startswith(
            "text/event-stream")
    finally:
        connection.close()


def test_official_client_needs_the_key(server):
    openai = pytest.importorskip("openai")
    url = f"{server.url}/v1"
    good = openai.OpenAI(base_url=url, api_key=KEYS[0], max_retries=0)
    assert good.completions.create(model="de", prompt=PROMPTS[0], max_tokens=3, temperature=0).choices[0].text
    assert good.models.retrieve("fr").id == "fr"
    for key in ("key-three", "key-on"):
        with pytest.raises(openai.AuthenticationError, match="had a wrong API key"):
            openai.OpenAI(base_url=url, api_key=key, max_retries=0).models.list()
    status, body, _ = request(server, "POST", "/v1/completions", b"{}", key=None)
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    assert request(server, "GET", "/health", key=None)[0] == 200  # load balancers need no key
    assert request(server, "GET", "/metrics", key=None)[0] == 401  # behind the key unless --open-metrics
    assert request(server, "GET", "/metrics")[0] == 200


def test_non_loopback_bind_without_a_key_is_refused(export_dir, capsys, monkeypatch):  # noqa: F811
    monkeypatch.delenv("SPARSEMEM_API_KEY", raising=False)
    with pytest.raises(SystemExit, match="--host 0.0.0.0 is reachable from other machines and no API key is set; "
                                         "set one with SPARSEMEM_API_KEY=<key>"):
        cli.main(["serve", "--export", str(export_dir), "--host", "0.0.0.0", "--port", "0"])


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.integers(-5, 70),
                    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 2), st.text(max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                           max_size=4), max_leaves=12)
TEXT = st.text(max_size=24) | st.lists(st.sampled_from(["w5", "w9", "w40", "w3"]), max_size=6).map(" ".join)
PROMPT = st.one_of(TEXT, st.lists(TEXT, max_size=3), st.lists(st.integers(-3, 200), max_size=12),
                   st.lists(st.lists(st.integers(0, 170), max_size=5), max_size=3),
                   st.lists(st.integers(0, 159), min_size=60, max_size=3000), VALUES)
MESSAGES = st.one_of(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"])
                                                              | st.text(max_size=5), "content": TEXT | VALUES}),
                              max_size=3), VALUES)
FIELD_NAMES = sorted(COMPLETION_FIELDS | CHAT_FIELDS | set(NEUTRAL)) + ["bogus", ""]


def bodies(main_field: str, main_value) -> st.SearchStrategy[bytes]:
    """Request bodies: plausible ones with fields of any value, arbitrary JSON, and raw bytes."""
    plausible = st.fixed_dictionaries(
        {"model": st.sampled_from(["de", "backbone", "auto", "xx"]) | VALUES, main_field: main_value},
        optional={"max_tokens": st.integers(1, 6) | VALUES, "temperature": st.floats(0, 2) | VALUES,
                  "stream": st.booleans() | VALUES, "logprobs": st.integers(0, 5) | st.booleans() | VALUES}
    ).flatmap(lambda body: st.dictionaries(st.sampled_from(FIELD_NAMES), VALUES, max_size=3).map(
        lambda extra: {**extra, **body}))
    as_json = st.one_of(plausible, VALUES).map(lambda value: json.dumps(value).encode())
    return st.one_of(as_json, as_json, as_json, st.binary(max_size=64))


def valid_answer(status: int, body: bytes, stream: bool) -> bool:
    if 400 <= status < 500:
        return "message" in json.loads(body)["error"]
    if status != 200:
        return False
    if not stream:
        return bool(json.loads(body)["choices"])
    events = [line[len(b"data: "):] for line in body.split(b"\n\n") if line.startswith(b"data: ")]
    return events[-1] == b"[DONE]" and all("error" not in json.loads(e) for e in events[:-1])


@pytest.mark.parametrize("path, main_field, main_value", [("/v1/completions", "prompt", PROMPT),
                                                          ("/v1/chat/completions", "messages", MESSAGES)])
def test_fuzzed_bodies_get_a_4xx_or_a_completion_and_the_server_survives(server, path, main_field, main_value):
    @settings(max_examples=500, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large])
    @given(body=bodies(main_field, main_value))
    def answers(body):
        status, reply, stream = request(server, "POST", path, body)
        assert valid_answer(status, reply, stream), (body[:300], status, reply[:300])

    answers()
    # Greedy: a sampled first token can be EOS (vocabulary of 160), which is a valid empty completion.
    status, reply, _ = request(server, "POST", "/v1/completions", json.dumps(
        {"model": "de", "prompt": PROMPTS[0], "max_tokens": 3, "temperature": 0}).encode())
    assert status == 200 and json.loads(reply)["usage"]["completion_tokens"] >= 1
