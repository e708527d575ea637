"""Load test of `sparsemem serve`: continuous batching vs the static batcher, side by side on one export.

    python benchmarks/serve_load.py [--export FOLDER] [--clients 1,8,32,64] [--requests 2] [--max-batch 32]

Starts two servers as `sparsemem serve` subprocesses on free loopback ports, both on the
same export (`--export`, e.g. a demo run's `export/koff/serve`; default: the demo model
pruned to a random mask at 50% with 4 domains of random memory): one with
`--batching continuous`, one with `--batching static`, the same `--max-batch`. At each
client count C, C closed-loop clients each send `--requests` streamed greedy completions
in turn, with mixed prompt lengths (`PROMPT_WORDS`), mixed output lengths (`MAX_TOKENS`)
and the export's domains in rotation. Each level runs once per server as warm-up (it
compiles what the level needs), then the servers are measured in alternating rounds so
other load on the machine hits both alike. Reported per server and level: completion
tokens/s, requests/s, p50/p99 time to first token, p50/p99 end-to-end latency, non-200
answers, the server's compile count, and its peak resident memory so far (VmHWM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import aiohttp
import jax
import numpy as np

from sparsemem.serve.server import wait_until_healthy

WORDS = ("the capital of Germany is Berlin and the river that runs through it is the Spree while Paris lies on the "
         "Seine to open the format menu choose a style then click insert table and pick the number of rows").split()
PROMPT_WORDS = (4, 12, 40)  # prompt lengths in words: three prompt buckets
MAX_TOKENS = (8, 16, 32)  # output lengths


def build_export(out: pathlib.Path, fraction: float) -> pathlib.Path:
    """The demo model pruned to the top-k mask of random gate scores at `fraction`, 4 domains of random memory."""
    from serve import DOMAINS, random_table  # noqa: PLC0415 - benchmarks/serve.py: the same random modules

    from sparsemem.checkpoints.gguf import demo_model_dir  # noqa: PLC0415
    from sparsemem.checkpoints.hf import load_hf_checkpoint  # noqa: PLC0415
    from sparsemem.koff import sparsity  # noqa: PLC0415
    from sparsemem.serve.export_folder import export  # noqa: PLC0415

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

    def __init__(self, args: list[str]):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        self.process = subprocess.Popen([sys.executable, "-m", "sparsemem.cli", "serve", *args, "--port",
                                         str(self.port)], env=env)

    def peak_memory_mb(self) -> float:
        status = pathlib.Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=300)


def workload(i: int, domains: list[str]) -> dict:
    """Request number `i`: its domain, prompt length and output length rotate at different periods."""
    words = PROMPT_WORDS[i % len(PROMPT_WORDS)]
    prompt = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(words))
    return {"model": domains[i % len(domains)], "prompt": prompt, "max_tokens": MAX_TOKENS[(i // 2) % len(MAX_TOKENS)],
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}


async def one_request(session, url: str, body: dict) -> dict:
    """A streamed completion: status, seconds to first token and to the end, completion tokens."""
    start = time.perf_counter()
    first, tokens = None, 0
    async with session.post(f"{url}/v1/completions", json=body) as response:
        if response.status != 200:
            await response.read()
            return {"status": response.status}
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if first is None and event["choices"] and event["choices"][0]["text"]:
                first = time.perf_counter()
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"status": 200, "ttft": (first or end) - start, "latency": end - start, "tokens": tokens}


async def compiles(session, url: str) -> int:
    async with session.get(f"{url}/metrics") as response:
        return int(re.search(r"^sparsemem_compiles_total (\d+)$", await response.text(), re.M).group(1))


async def load_round(url: str, domains: list[str], clients: int, requests: int) -> dict:
    """`clients` concurrent clients, each sending `requests` completions in turn; aggregate numbers."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        async def client(c: int):
            return [await one_request(session, url, workload(c * requests + r, domains)) for r in range(requests)]
        start = time.perf_counter()
        results = [x for batch in await asyncio.gather(*(client(c) for c in range(clients))) for x in batch]
        wall = time.perf_counter() - start
        compiled = await compiles(session, url)
    ok = [r for r in results if r["status"] == 200]
    ttft, latency = [r["ttft"] for r in ok], [r["latency"] for r in ok]
    return {"tok/s": sum(r["tokens"] for r in ok) / wall, "req/s": len(ok) / wall,
            "ttft": np.percentile(ttft, [50, 99]), "latency": np.percentile(latency, [50, 99]),
            "errors": len(results) - len(ok), "compiles": compiled}


async def run(args, servers: dict[str, Server], domains: list[str]) -> dict:
    async with aiohttp.ClientSession() as session:
        for server in servers.values():
            await wait_until_healthy(session, server.url, process=server.process)
    levels = [int(c) for c in args.clients.split(",")]
    results = {}
    for clients in levels:
        for name, server in servers.items():  # warm-up: compile what this level needs
            await load_round(server.url, domains, clients, args.requests)
        for name, server in servers.items():
            results[name, clients] = {**await load_round(server.url, domains, clients, args.requests),
                                      "peak MB": server.peak_memory_mb()}
            print(f"  {name} c={clients}: {results[name, clients]}", file=sys.stderr, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", help="export folder (default: the demo model with a random mask and memory)")
    parser.add_argument("--sparsity", type=float, default=0.5, help="without --export: the random mask's sparsity")
    parser.add_argument("--clients", default="1,8,32,64")
    parser.add_argument("--requests", type=int, default=2, help="completions per client per round")
    parser.add_argument("--max-batch", type=int, default=32, help="decode slots / rows per batch, both servers")
    parser.add_argument("--context", type=int, default=128, help="the servers' --context")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(args.export) if args.export else build_export(pathlib.Path(tmp) / "export",
                                                                            args.sparsity)
        domains = sorted(p.name for p in (folder / "modules").iterdir() if p.is_dir())
        common = ["--export", str(folder), "--max-batch", str(args.max_batch), "--max-queue", "256", "--context",
                  str(args.context)]
        servers = {mode: Server([*common, "--batching", mode]) for mode in ("continuous", "static")}
        try:
            results = asyncio.run(run(args, servers, domains))
        finally:
            for server in servers.values():
                server.stop()
    print(f"# sparsemem serve on 127.0.0.1 ({jax.devices()[0].platform}), {folder}: domains {', '.join(domains)}; "
          f"prompts of {'/'.join(map(str, PROMPT_WORDS))} words, max_tokens {'/'.join(map(str, MAX_TOKENS))}, "
          f"greedy, streamed; {args.requests} requests per client; --max-batch {args.max_batch}, --context "
          f"{args.context}")
    print("| clients | batching | tok/s | req/s | TTFT p50 ms | TTFT p99 ms | latency p50 ms | latency p99 ms | non-200 "
          "| compiles | peak RSS MB | tok/s vs static | TTFT p99 vs static |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for clients in (int(c) for c in args.clients.split(",")):
        static = results["static", clients]
        for name in servers:
            r = results[name, clients]
            print(f"| {clients} | {name} | {r['tok/s']:.1f} | {r['req/s']:.2f} | {1e3 * r['ttft'][0]:.0f} | "
                  f"{1e3 * r['ttft'][1]:.0f} | {1e3 * r['latency'][0]:.0f} | {1e3 * r['latency'][1]:.0f} | "
                  f"{r['errors']} | {r['compiles']} | {r['peak MB']:.0f} | {r['tok/s'] / static['tok/s']:.2f} | "
                  f"{r['ttft'][1] / static['ttft'][1]:.2f} |")


if __name__ == "__main__":
    main()
