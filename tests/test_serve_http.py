"""The HTTP server on 127.0.0.1 (tiny random export): parity with `generate`, batching, streaming, errors, overload."""

import asyncio
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import pytest

from sparsemem.experiment.run_export import export_run
from sparsemem.serve.generate import SamplingConfig, generate_ids
from sparsemem.serve.routing import CentroidRouter, prompt_features
from sparsemem.serve.scheduler import Scheduler, ServedModel
from sparsemem.serve.server import BackgroundServer, create_app, wait_until_healthy
from test_serve_compact import hard_masks, random_decoder, random_table, tiny
from test_serve_export import _tiny_run

CONTEXT = 64
PROMPTS = ["w5 w9 w11 w40 w7 w3", "w8", "w17 w33 w4", "w61 w2 w90 w14 w15 w16 w17 w18 w19 w20 w21 w22 w23 w24 w25 "
           "w26 w27"]  # the last one is in the second prompt-length bucket


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    cfg = tiny("gemma3")
    run = _tiny_run(tmp_path_factory.mktemp("serve"), random_decoder(cfg), hard_masks(cfg), random_table(cfg))
    return export_run(run)


@pytest.fixture(scope="module")
def served(export_dir):
    return ServedModel.from_export(export_dir)


@pytest.fixture(scope="module")
def server(served):
    scheduler = Scheduler(served, max_batch=8, max_queue=32, window_s=0.05)
    with BackgroundServer(create_app(scheduler, context=CONTEXT)) as running:
        running.scheduler = scheduler
        yield running


def reference(served, prompt, model, sampling):
    """What `generate` continues `prompt` with, alone, for `model` (a domain or the backbone)."""
    domain = None if model == served.name else model
    cfg = served.model.cfg
    ids = generate_ids(served.model, [served.tokenizer.encode(prompt)], sampling, pad_id=cfg.pad_id,
                       eos_id=cfg.eos_id, memory=served.memory([domain]))[0]
    return served.tokenizer.decode(ids)


async def post(session, url, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post(f"{url}/v1/completions", data=data) as response:
        return response.status, await response.json()


async def post_stream(session, url, body):
    """The SSE events of a streamed completion, parsed; the final `[DONE]` as the string "[DONE]"."""
    events = []
    async with session.post(f"{url}/v1/completions", json={**body, "stream": True}) as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
        async for line in response.content:
            line = line.decode().strip()
            if line.startswith("data: "):
                payload = line[len("data: "):]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def burst(url, bodies, stream=False):
    async def main():
        async with aiohttp.ClientSession() as session:
            send = post_stream if stream else post
            return await asyncio.gather(*(send(session, url, body) for body in bodies))
    return asyncio.run(main())


def test_concurrent_mixed_domain_burst_equals_generate_per_request(server, served):
    models = ["de", "en", "fr", "backbone", "fr", "de"]
    bodies = [{"model": m, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": (5, 9)[i % 2], "temperature": 0}
              for i, m in enumerate(models)]
    before = server.scheduler.stats()
    results = burst(server.url, bodies)
    after = server.scheduler.stats()
    for body, (status, reply) in zip(bodies, results):
        assert status == 200, reply
        want = reference(served, body["prompt"], body["model"], SamplingConfig(max_new_tokens=body["max_tokens"]))
        assert reply["choices"][0]["text"] == want, body
        assert reply["model"] == body["model"] and reply["usage"]["completion_tokens"] <= body["max_tokens"]
    # Requests shared batches, and the domain matters (else equality above would prove little).
    assert after["batches"] - before["batches"] < len(bodies)
    texts = {m: reference(served, PROMPTS[0], m, SamplingConfig(max_new_tokens=8)) for m in ("de", "en", "fr")}
    assert len(set(texts.values())) == 3


def test_streaming_yields_the_same_text_and_usage(server, served):
    body = {"model": "fr", "prompt": PROMPTS[0], "max_tokens": 9, "temperature": 0,
            "stream_options": {"include_usage": True}}
    (status, plain), = burst(server.url, [body])
    events, = burst(server.url, [body], stream=True)
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert final["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert final["usage"] == plain["usage"]
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == plain["choices"][0]["text"]
    assert len(events) > 3  # text arrived in pieces, not at the end


def test_stop_string_cuts_the_text_and_frees_the_row(server, served):
    full = reference(served, PROMPTS[2], "de", SamplingConfig(max_new_tokens=12))
    words = full.split()
    stop = " " + words[3]
    body = {"model": "de", "prompt": PROMPTS[2], "max_tokens": 12, "temperature": 0, "stop": ["w999", stop]}
    (status, reply), = burst(server.url, [body])
    assert status == 200 and reply["choices"][0]["finish_reason"] == "stop"
    assert reply["choices"][0]["text"] == full[: full.index(stop)]
    events, = burst(server.url, [body], stream=True)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == full[: full.index(stop)]


def test_sampling_follows_the_seed(server, served):
    body = {"model": "en", "prompt": PROMPTS[1], "max_tokens": 7, "temperature": 1.0, "top_k": 20, "seed": 3}
    (status, reply), = burst(server.url, [body])
    sampling = SamplingConfig(max_new_tokens=7, temperature=1.0, top_k=20, seed=3)
    assert reply["choices"][0]["text"] == reference(served, PROMPTS[1], "en", sampling)


BAD_REQUESTS = [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object, got list"),
    ({"prompt": "w5"}, 400, "'model' is required"),
    ({"model": "de"}, 400, "'prompt' is required"),
    ({"model": "nl", "prompt": "w5"}, 404, "model 'nl' does not exist; available: backbone, de, en, fr"),
    ({"model": "auto", "prompt": "w5"}, 400, "'auto' needs routing centroids and this server has none"),
    ({"model": "de", "prompt": 5}, 400, "'prompt' must be a string, got 5"),
    ({"model": "de", "prompt": "w5", "max_tokens": "4"}, 400, "'max_tokens' must be an integer >= 1, got \"4\""),
    ({"model": "de", "prompt": "w5", "max_tokens": True}, 400, "'max_tokens' must be an integer"),
    ({"model": "de", "prompt": "w5", "max_tokens": 0}, 400, "max_tokens must be >= 1, got 0"),
    ({"model": "de", "prompt": "w5", "temperature": -1}, 400, "temperature must be >= 0"),
    ({"model": "de", "prompt": "w5", "top_k": 1000}, 400, "'top_k' must be at most the vocabulary size 160"),
    ({"model": "de", "prompt": "w5", "stream": "yes"}, 400, "'stream' must be true or false"),
    ({"model": "de", "prompt": "w5", "stop": [""]}, 400, "'stop' must be a non-empty string"),
    ({"model": "de", "prompt": "w5", "n": 2}, 400, "'n' must be 1"),
    ({"model": "de", "prompt": " ".join(["w5"] * 60), "max_tokens": 8}, 400,
     r"prompt \(61 tokens\) plus max_tokens \(8\) exceeds this server's context of 64"),
]


def test_bad_requests_get_a_4xx_naming_the_problem(server):
    results = burst(server.url, [body for body, _, _ in BAD_REQUESTS])
    for (body, status, message), (got_status, reply) in zip(BAD_REQUESTS, results):
        assert got_status == status, (body, reply)
        assert re.search(message, reply["error"]["message"]), (message, reply)
    assert server.scheduler.stats()["queued"] == 0


def test_models_and_health(server):
    async def main():
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{server.url}/v1/models") as models, session.get(f"{server.url}/health") as health:
                return await models.json(), health.status, await health.json()
    models, status, health = asyncio.run(main())
    assert [(m["id"], m["parent"]) for m in models["data"]] == [("backbone", None), ("de", "backbone"),
                                                                 ("en", "backbone"), ("fr", "backbone")]
    assert status == 200 and health["status"] == "ok" and health["queued"] == 0


def test_auto_routes_each_prompt_to_its_nearest_domain(served):
    """Centroids placed at three prompts' own routing features: `auto` must pick each prompt's domain and
    answer exactly what naming that domain answers."""
    prompts = dict(zip(("fr", "de", "en"), PROMPTS[:3]))
    ids = [served.tokenizer.encode(p) for p in prompts.values()]
    layer = 1
    router = CentroidRouter(tuple(prompts), prompt_features(served.model, ids, layer, served.model.cfg.bos_id), layer)
    routed = dataclasses.replace(served, router=router)
    bodies = [{"model": "auto", "prompt": p, "max_tokens": 6, "temperature": 0} for p in prompts.values()]
    with BackgroundServer(create_app(Scheduler(routed, max_batch=8, max_queue=8, window_s=0.05), context=CONTEXT)) as s:
        results = burst(s.url, bodies)
    for (domain, prompt), (status, reply) in zip(prompts.items(), results):
        assert status == 200, reply
        assert reply["model"] == domain
        assert reply["choices"][0]["text"] == reference(served, prompt, domain, SamplingConfig(max_new_tokens=6))


def test_full_queue_answers_429_and_loses_nothing(served):
    scheduler = Scheduler(served, max_batch=1, max_queue=2, window_s=0.0)
    bodies = [{"model": "de", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0}] * 10
    with BackgroundServer(create_app(scheduler, context=CONTEXT)) as running:
        results = burst(running.url, bodies)
        stats = scheduler.stats()
    statuses = [status for status, _ in results]
    assert set(statuses) == {200, 429}, statuses
    want = reference(served, PROMPTS[0], "de", SamplingConfig(max_new_tokens=6))
    for status, reply in results:
        if status == 200:
            assert reply["choices"][0]["text"] == want
        else:
            assert "queue is full (2 waiting)" in reply["error"]["message"]
    assert stats["completed"] == statuses.count(200) and stats["rejected"] == statuses.count(429)


def test_client_that_disconnects_frees_its_row(server):
    before = server.scheduler.stats()["cancelled"]

    async def main():
        reader, writer = await asyncio.open_connection(server.host, server.port)
        body = json.dumps({"model": "en", "prompt": "w5", "max_tokens": 60, "temperature": 0, "stream": True})
        writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        await writer.drain()
        await reader.readuntil(b"data: ")  # the first token arrived: the request is running
        writer.close()
        await writer.wait_closed()

    asyncio.run(main())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = server.scheduler.stats()
        if stats["running"] == 0 and stats["cancelled"] > before:
            break
        time.sleep(0.05)
    assert stats["cancelled"] == before + 1 and stats["running"] == 0 and stats["queued"] == 0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_drains_in_flight_requests_on_sigterm(export_dir, served):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-m", "sparsemem.cli", "serve", "--export", str(export_dir),
                                "--port", str(port), "--context", str(CONTEXT)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    body = {"model": "fr", "prompt": PROMPTS[0], "max_tokens": 40, "temperature": 0, "stream": True}

    async def main():
        async with aiohttp.ClientSession() as session:
            await wait_until_healthy(session, url, timeout_s=300, process=process)
            text, signalled = "", False
            async with session.post(f"{url}/v1/completions", json=body) as response:
                async for line in response.content:
                    line = line.decode().strip()
                    if line.startswith("data: {"):
                        text += json.loads(line[6:])["choices"][0]["text"]
                        if not signalled:
                            process.send_signal(signal.SIGTERM)  # mid-request: it must still complete
                            signalled = True
            return text

    try:
        text = asyncio.run(main())
        assert process.wait(timeout=60) == 0, process.stdout.read().decode()
    finally:
        process.kill()
    assert text == reference(served, PROMPTS[0], "fr", SamplingConfig(max_new_tokens=40))
