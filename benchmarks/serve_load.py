"""Load test of `sparsemem serve`: dense Gemma-3-270M vs compacted backbone + per-domain memory, over 127.0.0.1.

    python benchmarks/serve_load.py [--sparsity 0.5] [--concurrency 1,4,16] [--requests 2] [--max-tokens 8]

Starts two servers as `sparsemem serve` subprocesses on free loopback ports: *dense*
(`--model`, the demo model, no memory) and *compacted* (`--export` of the demo model
pruned to the deterministic top-k mask of random gate scores at `--sparsity`, with
4 domains of random KV memory + LoRA, requests cycling through the domains). At each
concurrency C, C clients each send `--requests` streamed completions one after the
other; the two servers are measured in alternating rounds (after a warm-up round that
compiles every shape), so load from other processes hits both alike. Reported:
requests/s, completion tokens/s, p50/p99 time to first token, p50/p99 per-token
latency (time between first and last token / (tokens - 1)), 429s, and compacted/dense ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

import aiohttp
import jax
import numpy as np

from serve import DOMAINS, random_table  # benchmarks/serve.py: the same random memory modules

from sparsemem.checkpoints.gguf import demo_model_dir
from sparsemem.checkpoints.hf import load_hf_checkpoint
from sparsemem.koff import sparsity
from sparsemem.serve.export_folder import export
from sparsemem.serve.server import wait_until_healthy

PROMPTS = ["The capital of Germany is", "Die Hauptstadt von Frankreich ist", "La ville de Lyon est",
           "Open the Format menu and choose", "To insert a table, click"]


def build_export(out: pathlib.Path, fraction: float) -> pathlib.Path:
    folder = demo_model_dir()
    decoder = load_hf_checkpoint(folder)
    cfg = decoder.cfg
    keys = jax.random.split(jax.random.key(0), 2)
    log_alphas = {"head": 2 * jax.random.normal(keys[0], (cfg.num_layers, cfg.num_heads)),
                  "neuron": 2 * jax.random.normal(keys[1], (cfg.num_layers, cfg.d_ff))}
    masks = jax.tree.map(np.asarray, sparsity.deterministic_masks(cfg, log_alphas, fraction))
    return export(decoder, masks, random_table(cfg, slots=16, rank=8), DOMAINS, 2.0, out,
                  tokenizer_file=pathlib.Path(folder) / "tokenizer.json")


class Server:
    """`sparsemem serve ARGS` on a free loopback port, stopped with SIGTERM."""

    def __init__(self, args: list[str], max_batch: int, max_queue: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        self.process = subprocess.Popen([sys.executable, "-m", "sparsemem.cli", "serve", *args, "--port",
                                         str(self.port), "--max-batch", str(max_batch), "--max-queue",
                                         str(max_queue)], env=env)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)


async def one_request(session, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """A streamed completion: status, seconds to first token, seconds from first to last token, tokens."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async with session.post(f"{url}/v1/completions", json=body) as response:
        if response.status != 200:
            await response.read()
            return {"status": response.status}
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            now = time.perf_counter()
            if event["choices"][0]["text"]:
                first = first or now
                last = now
            if "usage" in event:
                tokens = event["usage"]["completion_tokens"]
    first = first or time.perf_counter()
    return {"status": 200, "ttft": first - start, "decode": (last or first) - first, "tokens": tokens}


async def load_round(url: str, models: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` concurrent clients, each sending `requests` completions in turn; aggregate numbers."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        async def client(c: int):
            out = []
            for r in range(requests):
                i = c * requests + r
                out.append(await one_request(session, url, models[i % len(models)], PROMPTS[i % len(PROMPTS)],
                                             max_tokens))
            return out
        start = time.perf_counter()
        results = [x for batch in await asyncio.gather(*(client(c) for c in range(clients))) for x in batch]
        wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    ttft = [r["ttft"] for r in ok]
    per_token = [r["decode"] / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    return {"req/s": len(ok) / wall, "tok/s": sum(r["tokens"] for r in ok) / wall,
            "ttft": (np.percentile(ttft, 50), np.percentile(ttft, 99)),
            "tpot": (np.percentile(per_token, 50), np.percentile(per_token, 99)) if per_token else (np.nan, np.nan),
            "429": sum(r["status"] == 429 for r in results), "other": sum(r["status"] not in (200, 429)
                                                                          for r in results)}


async def run(args, servers: dict[str, tuple[Server, list[str]]]) -> dict:
    async with aiohttp.ClientSession() as session:
        for server, _ in servers.values():
            await wait_until_healthy(session, server.url, process=server.process)
    levels = [int(c) for c in args.concurrency.split(",")]
    for clients in levels:  # warm-up, the same rounds: compile the batch sizes and domain mixes they will meet
        for server, models in servers.values():
            await load_round(server.url, models, clients, args.requests, args.max_tokens)
    results = {}
    for clients in levels:
        for name, (server, models) in servers.items():
            results[name, clients] = await load_round(server.url, models, clients, args.requests, args.max_tokens)
            print(f"  {name} c={clients}: {results[name, clients]}", file=sys.stderr, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.5, help="target sparsity over prunable params")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=2, help="completions per client per round")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=64)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_export(pathlib.Path(tmp) / "export", args.sparsity)
        servers = {"dense": (Server(["--model", str(demo_model_dir()), "--name", "dense"], args.max_batch,
                                    args.max_queue), ["dense"]),
                   "compacted+memory": (Server(["--export", str(folder)], args.max_batch, args.max_queue),
                                        list(DOMAINS))}
        try:
            results = asyncio.run(run(args, servers))
        finally:
            for server, _ in servers.values():
                server.stop()
    print(f"# sparsemem serve on 127.0.0.1, Gemma-3-270M float32 ({jax.devices()[0].platform}); compacted: mask at "
          f"{args.sparsity} of prunable params, 16 KV slots + LoRA r=8 on q,v, {len(DOMAINS)} domains mixed; "
          f"{args.requests} streamed requests per client, max_tokens {args.max_tokens}, greedy, max batch "
          f"{args.max_batch}")
    print("| clients | backbone | req/s | tok/s | TTFT p50 ms | TTFT p99 ms | per-token p50 ms | per-token p99 ms "
          "| non-200 | tok/s x | TTFT p50 x | per-token p50 x |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for clients in (int(c) for c in args.concurrency.split(",")):
        dense = results["dense", clients]
        for name in servers:
            r = results[name, clients]
            print(f"| {clients} | {name} | {r['req/s']:.2f} | {r['tok/s']:.1f} | {1e3 * r['ttft'][0]:.0f} | "
                  f"{1e3 * r['ttft'][1]:.0f} | {1e3 * r['tpot'][0]:.0f} | {1e3 * r['tpot'][1]:.0f} | "
                  f"{r['429'] + r['other']} | {r['tok/s'] / dense['tok/s']:.2f} | "
                  f"{dense['ttft'][0] / r['ttft'][0]:.2f} | {dense['tpot'][0] / r['tpot'][0]:.2f} |")


if __name__ == "__main__":
    main()
