"""The HTTP server on 127.0.0.1 (tiny random export): parity with `generate` for both batchers, streaming, chat,
log-probabilities, a flat compile count, errors, overload, deadlines, and the official `openai` client."""

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
import numpy as np
import pytest

from sparsemem.experiment.run_export import export_run
from sparsemem.serve.generate import SamplingConfig, generate_ids
from sparsemem.serve.routing import CentroidRouter, prompt_features
from sparsemem.serve.scheduler import ContinuousScheduler, ServedModel, StaticScheduler
from sparsemem.serve.server import BackgroundServer, create_app, wait_until_healthy
from test_serve_compact import hard_masks, random_decoder, random_table, tiny
from test_serve_export import _tiny_run

CONTEXT = 64
PROMPTS = ["w5 w9 w11 w40 w7 w3", "w8", "w17 w33 w4", "w61 w2 w90 w14 w15 w16 w17 w18 w19 w20 w21 w22 w23 w24 w25 "
           "w26 w27"]  # the last one is in the second prompt-length bucket


CHAT_TEMPLATE = ("{{ bos_token }} {% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}"
                 "{{ raise_exception('unknown role ' + m.role) }}{% endif %}"
                 "w{{ {'system': 1, 'user': 3, 'assistant': 4}[m.role] }} {{ m.content }} {% endfor %}"
                 "{% if add_generation_prompt %}w4{% endif %}")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    cfg = tiny("gemma3")
    tmp = tmp_path_factory.mktemp("serve")
    run = _tiny_run(tmp, random_decoder(cfg), hard_masks(cfg), random_table(cfg))
    (tmp / "model" / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return export_run(run)


@pytest.fixture(scope="module")
def served(export_dir):
    return ServedModel.from_export(export_dir)


@pytest.fixture(scope="module")
def server(served):
    scheduler = ContinuousScheduler(served, context=CONTEXT, max_batch=8, max_queue=64)
    with BackgroundServer(create_app(scheduler, context=CONTEXT)) as running:
        running.scheduler = scheduler
        yield running


def reference_ids(served, prompt_ids, model, sampling):
    """The token ids `generate` continues `prompt_ids` with, alone, for `model` (a domain or the backbone)."""
    domain = None if model == served.name else model
    cfg = served.model.cfg
    return generate_ids(served.model, [list(prompt_ids)], sampling, pad_id=cfg.pad_id, eos_id=cfg.eos_id,
                        memory=served.memory([domain]))[0]


def reference(served, prompt, model, sampling):
    """What `generate` continues the text `prompt` with, alone, for `model`."""
    return served.tokenizer.decode(reference_ids(served, served.tokenizer.encode(prompt), model, sampling))


async def post(session, url, body, path="/v1/completions"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post(f"{url}{path}", data=data) as response:
        return response.status, await response.json()


async def post_stream(session, url, body, path="/v1/completions"):
    """The SSE events of a streamed completion, parsed; the final `[DONE]` as the string "[DONE]"."""
    events = []
    async with session.post(f"{url}{path}", json={**body, "stream": True}) as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
        async for line in response.content:
            line = line.decode().strip()
            if line.startswith("data: "):
                payload = line[len("data: "):]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def burst(url, bodies, stream=False, path="/v1/completions"):
    async def main():
        async with aiohttp.ClientSession() as session:
            send = post_stream if stream else post
            return await asyncio.gather(*(send(session, url, body, path) for body in bodies))
    return asyncio.run(main())


def get(url, path):
    async def main():
        async with aiohttp.ClientSession() as session, session.get(f"{url}{path}") as response:
            return response.status, await response.text()
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
    # Rows of several domains shared decode steps, and the domain matters (else equality above would prove little).
    tokens = sum(reply["usage"]["completion_tokens"] for _, reply in results)
    assert after["batches"] - before["batches"] < tokens - len(bodies)
    texts = {m: reference(served, PROMPTS[0], m, SamplingConfig(max_new_tokens=8)) for m in ("de", "en", "fr")}
    assert len(set(texts.values())) == 3


def test_streaming_yields_the_same_text_and_usage(server, served):
    body = {"model": "fr", "prompt": PROMPTS[0], "max_tokens": 9, "temperature": 0,
            "stream_options": {"include_usage": True}}
    (status, plain), = burst(server.url, [body])
    events, = burst(server.url, [body], stream=True)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"] == plain["usage"]
    assert events[-3]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == plain["choices"][0]["text"]
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
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


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
    ({"model": "de", "prompt": 5}, 400, "'prompt' must be a string, a list of strings, a list of token ids"),
    ({"model": "de", "prompt": [[2, 5], []]}, 400, "'prompt' must be a string, a list of strings"),
    ({"model": "de", "prompt": [2, 500]}, 400, r"'prompt' token ids must be in \[0, 160\)"),
    ({"model": "de", "prompt": "w5", "max_tokens": "4"}, 400, "'max_tokens' must be an integer >= 1, got \"4\""),
    ({"model": "de", "prompt": "w5", "max_tokens": True}, 400, "'max_tokens' must be an integer"),
    ({"model": "de", "prompt": "w5", "max_tokens": 0}, 400, "max_tokens must be >= 1, got 0"),
    ({"model": "de", "prompt": "w5", "temperature": -1}, 400, "temperature must be a finite number >= 0"),
    (b'{"model": "de", "prompt": "w5", "temperature": NaN}', 400, "'temperature' must be a finite number"),
    (b'{"model": "de", "prompt": "w5", "top_p": Infinity}', 400, "'top_p' must be a number in"),
    ({"model": "de", "prompt": "w5", "top_p": 0}, 400, r"top_p must be in \(0, 1\]"),
    ({"model": "de", "prompt": "w5", "seed": 2 ** 70}, 400, r"seed must be in \[0, 2\*\*64\)"),
    ({"model": "de", "prompt": "w5", "seed": -1}, 400, r"seed must be in \[0, 2\*\*64\)"),
    ({"model": "de", "prompt": "w5", "logprobs": 21}, 400, r"logprobs must be in \[0, 20\]"),
    ({"model": "de", "prompt": "w5", "echo": True, "logprobs": 1}, 400, "'echo' with 'logprobs' is not supported"),
    ({"model": "de", "prompt": "w5", "frequency_penalty": 0.5}, 400, "'frequency_penalty' is not supported"),
    ({"model": "de", "prompt": "w5", "best_of": 3}, 400, "'best_of' must be 1"),
    ({"model": "de", "prompt": "w5", "temprature": 0}, 400, "'temprature' is not a field this endpoint knows"),
    ({"model": "de", "prompt": "w5", "top_k": 1000}, 400, "'top_k' must be at most the vocabulary size 160"),
    ({"model": "de", "prompt": "w5", "stream": "yes"}, 400, "'stream' must be true or false"),
    ({"model": "de", "prompt": "w5", "stop": [""]}, 400, "'stop' must be a non-empty string"),
    ({"model": "de", "prompt": "w5", "n": 2}, 400, "'n' must be 1"),
    ({"model": "de", "prompt": " ".join(["w5"] * 60), "max_tokens": 8}, 400,
     r"prompt \(61 tokens\) plus max_tokens \(8\) exceeds this server's context of 64"),
]


BAD_CHATS = [
    ({"model": "de", "messages": []}, 400, "'messages' is required"),
    ({"model": "de", "messages": [{"role": "user", "content": 5}]}, 400, r"'messages\[0\].content' must be a string"),
    ({"model": "de", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
     "this server reads text only"),
    ({"model": "de", "messages": [{"role": "tool", "content": "w5"}]}, 400, "chat template refused.*unknown role tool"),
    ({"model": "de", "messages": [{"role": "user", "content": "w5"}], "tools": [{"type": "function"}]}, 400,
     "'tools' is not supported by this server"),
    ({"model": "de", "messages": [{"role": "user", "content": "w5"}], "top_logprobs": 2}, 400,
     "'top_logprobs' needs 'logprobs': true"),
]


def test_bad_requests_get_a_4xx_naming_the_problem(server):
    for path, cases in (("/v1/completions", BAD_REQUESTS), ("/v1/chat/completions", BAD_CHATS)):
        results = burst(server.url, [body for body, _, _ in cases], path=path)
        for (body, status, message), (got_status, reply) in zip(cases, results):
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


def test_static_batcher_serves_any_mix_of_sampling_settings(served):
    """A greedy request with a seed first, then greedy and seeded sampled ones: one batch, each row as alone."""
    settings = [{"temperature": 0, "seed": 9}, {"temperature": 0}, {"temperature": 0.7, "seed": 1, "top_p": 0.8},
                {"temperature": 1.3, "seed": 2, "top_k": 5}]
    bodies = [{"model": m, "prompt": PROMPTS[0], "max_tokens": 6, **extra} for m, extra in zip(
        ("de", "en", "fr", "de"), settings)]
    scheduler = StaticScheduler(served, max_batch=8, max_queue=8, window_s=0.5)
    with BackgroundServer(create_app(scheduler, context=CONTEXT)) as running:
        results = burst(running.url, bodies)
    for body, (status, reply) in zip(bodies, results):
        assert status == 200, reply
        sampling = SamplingConfig(max_new_tokens=6, temperature=body["temperature"], seed=body.get("seed", 0),
                                  top_p=body.get("top_p", 1.0), top_k=body.get("top_k"))
        assert reply["choices"][0]["text"] == reference(served, PROMPTS[0], body["model"], sampling)
    assert scheduler.stats()["batches"] == 1


def test_compile_count_stays_flat_under_fifty_distinct_settings(server):
    """After one warm-up request per code path, 50 random settings (temperature, top-k, top-p, seed, logprobs,
    lengths within the prompt bucket) compile nothing: the count in /metrics does not move."""
    def compiles():
        status, text = get(server.url, "/metrics")
        assert status == 200
        return int(re.search(r"^sparsemem_compiles_total (\d+)$", text, re.M).group(1))

    warm = [{"model": "de", "prompt": PROMPTS[0], "max_tokens": 3, "temperature": t, "top_p": p, "logprobs": n}
            for t, p, n in ((0, 1, None), (1.0, 0.5, 3))]
    burst(server.url, warm)
    before = compiles()
    rng = np.random.default_rng(0)
    bodies = [{"model": str(rng.choice(["de", "en", "fr", "backbone"])), "prompt": PROMPTS[i % 3],
               "max_tokens": int(rng.integers(1, 12)), "temperature": float(rng.choice([0, rng.uniform(0.1, 2)])),
               "top_k": int(rng.integers(1, 160)), "top_p": float(rng.uniform(0.05, 1)),
               "seed": int(rng.integers(0, 2 ** 63)) * 2 + 1, "logprobs": int(rng.integers(0, 6))}
              for i in range(50)]
    assert len({json.dumps(b, sort_keys=True) for b in bodies}) == 50
    results = burst(server.url, bodies)
    assert all(status == 200 for status, _ in results), results
    assert compiles() == before


def test_prompt_forms_logprobs_and_echo(server, served):
    ids = served.tokenizer.encode(PROMPTS[2])
    sampling = SamplingConfig(max_new_tokens=5)
    want = {p: reference(served, p, "en", sampling) for p in PROMPTS[:2]}
    (status, reply), = burst(server.url, [{"model": "en", "prompt": PROMPTS[:2], "max_tokens": 5, "temperature": 0}])
    assert status == 200 and [c["index"] for c in reply["choices"]] == [0, 1]
    assert [c["text"] for c in reply["choices"]] == [want[p] for p in PROMPTS[:2]]
    forms = [ids, [ids, served.tokenizer.encode(PROMPTS[0])]]
    results = burst(server.url, [{"model": "en", "prompt": f, "max_tokens": 5, "temperature": 0, "logprobs": 3}
                                 for f in forms])
    reply = results[0][1]
    assert reply["choices"][0]["text"] == reference(served, PROMPTS[2], "en", sampling)
    assert [c["text"] for c in results[1][1]["choices"]] == [reference(served, p, "en", sampling)
                                                             for p in (PROMPTS[2], PROMPTS[0])]
    logprobs = reply["choices"][0]["logprobs"]
    assert "".join(logprobs["tokens"]).replace("w", " w").strip() == reply["choices"][0]["text"]
    for chosen, top in zip(logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert len(top) == 3 and chosen <= 0 and max(top.values()) == pytest.approx(chosen, abs=1e-5)  # greedy
    (status, echoed), = burst(server.url, [{"model": "en", "prompt": PROMPTS[2], "max_tokens": 5, "temperature": 0,
                                            "echo": True}])
    assert echoed["choices"][0]["text"] == PROMPTS[2] + reply["choices"][0]["text"]


def test_chat_renders_the_template_and_streams_the_same_text(server, served):
    messages = [{"role": "system", "content": "w7 w8"}, {"role": "user", "content": [{"type": "text", "text": "w9"}]}]
    body = {"model": "fr", "messages": messages, "max_tokens": 6, "temperature": 0, "logprobs": True,
            "top_logprobs": 2}
    (status, reply), = burst(server.url, [body], path="/v1/chat/completions")
    assert status == 200 and reply["object"] == "chat.completion", reply
    prompt = served.tokenizer.encode("w2 w1 w7 w8 w3 w9 w4", add_bos=False)  # CHAT_TEMPLATE, bos_token "w2"
    want = served.tokenizer.decode(reference_ids(served, prompt, "fr", SamplingConfig(max_new_tokens=6)))
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": want}
    assert reply["usage"]["prompt_tokens"] == len(prompt)
    assert [len(t["top_logprobs"]) for t in reply["choices"][0]["logprobs"]["content"]] == \
        [2] * reply["usage"]["completion_tokens"]
    events, = burst(server.url, [body], stream=True, path="/v1/chat/completions")
    assert events[0]["choices"][0]["delta"]["role"] == "assistant" and events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == want


def test_metrics_are_prometheus_text(server):
    burst(server.url, [{"model": "de", "prompt": PROMPTS[0], "max_tokens": 2}])
    status, text = get(server.url, "/metrics")
    assert status == 200
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    for name in ('sparsemem_requests_total{outcome="completed"}', "sparsemem_generation_tokens_total",
                 "sparsemem_queue_depth", "sparsemem_time_to_first_token_seconds_count",
                 'sparsemem_inter_token_latency_seconds_bucket{le="+Inf"}', "sparsemem_compiles_total"):
        assert float(samples[name]) >= 0, name
    assert float(samples['sparsemem_requests_total{outcome="completed"}']) >= 1


def test_request_past_its_deadline_gets_504(served):
    scheduler = ContinuousScheduler(served, context=CONTEXT, max_batch=2, max_queue=8)
    with BackgroundServer(create_app(scheduler, context=CONTEXT, request_timeout_s=1e-6)) as running:
        (status, reply), = burst(running.url, [{"model": "de", "prompt": PROMPTS[0], "max_tokens": 4}])
        stats = scheduler.stats()
    assert status == 504 and "did not finish within its deadline" in reply["error"]["message"]
    assert stats["timed_out"] == 1


def test_health_fails_once_the_decode_loop_is_dead(served):
    class Broken(ContinuousScheduler):
        def _work(self):
            raise RuntimeError("device lost")

    with BackgroundServer(create_app(Broken(served, context=CONTEXT), context=CONTEXT)) as running:
        deadline = time.monotonic() + 30
        while get(running.url, "/health")[0] != 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        status, text = get(running.url, "/health")
        (code, reply), = burst(running.url, [{"model": "de", "prompt": PROMPTS[0], "max_tokens": 4}])
    assert status == 503 and json.loads(text)["status"] == "decode loop stopped"
    assert code == 503, reply


def test_official_openai_client(server, served):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    assert client.models.retrieve("de").id == "de"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nl")
    want = reference(served, PROMPTS[0], "de", SamplingConfig(max_new_tokens=7))
    done = client.completions.create(model="de", prompt=PROMPTS[0], max_tokens=7, temperature=0)
    assert done.choices[0].text == want
    pieces = client.completions.create(model="de", prompt=PROMPTS[0], max_tokens=7, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in pieces if chunk.choices) == want
    chat = client.chat.completions.create(model="en", messages=[{"role": "user", "content": "w9"}], max_tokens=4,
                                          temperature=0, seed=5)
    prompt = served.tokenizer.encode("w2 w3 w9 w4", add_bos=False)
    assert chat.choices[0].message.content == served.tokenizer.decode(
        reference_ids(served, prompt, "en", SamplingConfig(max_new_tokens=4)))
    with pytest.raises(openai.BadRequestError, match="'logit_bias' is not supported"):
        client.completions.create(model="de", prompt="w5", logit_bias={"5": 3})


def test_auto_routes_each_prompt_to_its_nearest_domain(served):
    """Centroids placed at three prompts' own routing features: `auto` must pick each prompt's domain and
    answer exactly what naming that domain answers."""
    prompts = dict(zip(("fr", "de", "en"), PROMPTS[:3]))
    ids = [served.tokenizer.encode(p) for p in prompts.values()]
    layer = 1
    router = CentroidRouter(tuple(prompts), prompt_features(served.model, ids, layer, served.model.cfg.bos_id), layer)
    routed = dataclasses.replace(served, router=router)
    bodies = [{"model": "auto", "prompt": p, "max_tokens": 6, "temperature": 0} for p in prompts.values()]
    with BackgroundServer(create_app(ContinuousScheduler(routed, context=CONTEXT, max_batch=8, max_queue=8),
                                     context=CONTEXT)) as s:
        results = burst(s.url, bodies)
    for (domain, prompt), (status, reply) in zip(prompts.items(), results):
        assert status == 200, reply
        assert reply["model"] == domain
        assert reply["choices"][0]["text"] == reference(served, prompt, domain, SamplingConfig(max_new_tokens=6))


def test_full_queue_answers_429_and_loses_nothing(served):
    scheduler = ContinuousScheduler(served, context=CONTEXT, max_batch=1, max_queue=2)
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


def test_chat_without_a_template_is_a_clear_400(served):
    from sparsemem.serve.openai_api import ApiError, parse_chat
    from sparsemem.serve.server import resolver

    body = {"model": "de", "messages": [{"role": "user", "content": "w5"}]}
    with pytest.raises(ApiError, match="model 'de' has no chat template .* use /v1/completions") as error:
        parse_chat(body, dataclasses.replace(served, chat=None), CONTEXT, resolver(served))
    assert error.value.status == 400 and error.value.param == "messages"
