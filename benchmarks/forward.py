"""Forward throughput and peak memory: sparsemem (JAX) vs transformers (PyTorch) on Gemma-3-270M.

Each backend runs in its own subprocess (so peak memory is its own), alternately,
`--rounds` times; the best time per backend is reported. Two workloads:
- `hidden`: the backbone's final hidden states (no vocabulary projection);
- `lm_loss`: mean next-token loss. sparsemem computes it in vocabulary chunks;
  transformers materialises the full `[B, T, V]` logits (its standard path).
Peak memory is the largest resident set size sampled while the workload runs
(warm-up included), and its growth over the RSS just before (weights loaded).
GFLOP/s are the analytic forward FLOPs (`sparsemem.scale.flops.forward_flops`, the same
count for both backends) per second; % of peak divides by the machine's float32 peak
(`hardware.peak_flops`: the cores' FMA rate at the reported clock, or the best measured
matmul probe when the cores turbo above it).

    python benchmarks/forward.py [--batch 8 --seq 512 --rounds 2 --repeats 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

import psutil

import hardware


class PeakRSS:
    """Samples this process's RSS in a background thread; `.peak` is the max seen."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._proc = psutil.Process()

    def __enter__(self):
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _measure(run, repeats: int) -> dict:
    before = psutil.Process().memory_info().rss
    with PeakRSS() as rss:
        run()  # compile / warm up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return {"seconds": min(times), "peak_rss": rss.peak, "rss_growth": rss.peak - before}


def run_sparsemem(folder: str, batch: int, seq: int, repeats: int, workload: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from sparsemem.checkpoints.hf import load_hf_checkpoint
    from sparsemem.models.loss import token_cross_entropy

    graphdef, state = nnx.split(load_hf_checkpoint(folder))
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 1000, (batch, seq)), jnp.int32)

    @jax.jit
    def hidden(state, tokens):
        return nnx.merge(graphdef, state)(tokens)[0]

    @jax.jit
    def lm_loss(state, tokens):
        model = nnx.merge(graphdef, state)
        h, _ = model(tokens[:, :-1])
        return token_cross_entropy(model, h, tokens[:, 1:]).mean()

    fn = hidden if workload == "hidden" else lm_loss
    return _measure(lambda: jax.block_until_ready(fn(state, tokens)), repeats)


def run_transformers(folder: str, batch: int, seq: int, repeats: int, workload: str) -> dict:
    import numpy as np
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = torch.as_tensor(np.random.default_rng(0).integers(3, 1000, (batch, seq)))

    @torch.inference_mode()
    def run():
        if workload == "hidden":
            return model.model(tokens).last_hidden_state
        return model(tokens[:, :-1], labels=tokens[:, :-1]).loss

    result = _measure(run, repeats)
    result["threads"] = torch.get_num_threads()
    return result


def _child(args) -> None:
    fn = run_sparsemem if args.backend == "sparsemem" else run_transformers
    print(json.dumps(fn(args.folder, args.batch, args.seq, args.repeats, args.workload)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per backend; best is kept")
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards per run (after one warm-up)")
    parser.add_argument("--workloads", default="hidden,lm_loss")
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:
        return _child(args)

    from sparsemem.checkpoints.gguf import demo_model_dir
    from sparsemem.checkpoints.hf import read_config
    from sparsemem.scale.flops import forward_flops

    folder = str(demo_model_dir())
    cfg = read_config(demo_model_dir())
    tokens = args.batch * args.seq
    peak, peak_source = hardware.peak_flops("float32")
    print(f"Gemma-3-270M, float32, batch {args.batch} x {args.seq} = {tokens} tokens, CPU "
          f"({psutil.cpu_count()} cores); best of {args.rounds} rounds x {args.repeats} repeats; "
          f"peak {peak / 1e9:.0f} GFLOP/s ({peak_source})", flush=True)
    header = (f"{'workload':<9} {'backend':<13} {'tokens/s':>10} {'GFLOP/s':>8} {'% peak':>7} {'peak RSS':>10} "
              f"{'RSS growth':>11} {'speed ratio':>12} {'memory ratio':>13}")
    rows = [header, "-" * len(header)]
    for workload in args.workloads.split(","):
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for backend in ("sparsemem", "transformers"):
                cmd = [sys.executable, __file__, "--backend", backend, "--workload", workload, "--folder", folder,
                       "--batch", str(args.batch), "--seq", str(args.seq), "--repeats", str(args.repeats)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                result = json.loads(out.strip().splitlines()[-1])
                print(f"  {workload} {backend}: {result['seconds']:.2f}s", flush=True)
                if backend not in best or result["seconds"] < best[backend]["seconds"]:
                    best[backend] = {**result, "peak_rss": max(result["peak_rss"],
                                                                best.get(backend, {}).get("peak_rss", 0))}
        ours, ref = best["sparsemem"], best["transformers"]
        seq = args.seq - 1 if workload == "lm_loss" else args.seq  # the loss predicts tokens 1..T-1
        work = forward_flops(cfg, args.batch, seq, logits=workload == "lm_loss")
        for name, r in (("sparsemem", ours), ("transformers", ref)):
            speed = ref["seconds"] / r["seconds"]
            memory = r["peak_rss"] / ref["peak_rss"]
            rate = work / r["seconds"]
            rows.append(f"{workload:<9} {name:<13} {tokens / r['seconds']:>10.0f} {rate / 1e9:>8.1f} "
                        f"{100 * rate / peak:>6.0f}% {r['peak_rss'] / 2**30:>8.2f}Gi "
                        f"{r['rss_growth'] / 2**30:>9.2f}Gi {speed:>11.2f}x {memory:>12.2f}x")
    print("\n".join(rows))
    print("speed ratio = transformers time / this time; memory ratio = this peak RSS / transformers' "
          f"(torch threads: {ref.get('threads')}; XLA uses all cores)")


if __name__ == "__main__":
    main()
