"""Speed and memory of the KOFF train step next to a plain frozen forward+backward.

    python benchmarks/train_step.py [--batch 4 --seq 256 --steps 3 --domains 8,512]

Model: Gemma-3-270M with random weights (speed does not depend on the values),
float32. The baseline is the same decoder's forward and backward through all
activations (gradient w.r.t. its per-layer attention-norm weights, whose weight
gradient costs nothing), i.e. what any method that trains inside the network pays;
the KOFF step adds gate sampling, KV memory, LoRA and the optimiser updates.
Prints a table of seconds/step, tokens/s, overhead ratio and peak host RSS.
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsemem.koff.config import KoffConfig
from sparsemem.models.config import preset
from sparsemem.models.decoder import Decoder
from sparsemem.models.loss import masked_mean, token_cross_entropy
from sparsemem.train import KoffTrainer


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def make_batch(cfg, batch: int, seq: int, num_domains: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, cfg.vocab_size, (batch, seq + 1))
    return dict(inputs=toks[:, :-1], targets=toks[:, 1:], loss_mask=np.ones((batch, seq), np.float32),
                segment_ids=np.ones((batch, seq), np.int32), positions=np.tile(np.arange(seq), (batch, 1)),
                domain=rng.integers(0, num_domains, batch))


def time_steps(run, steps: int) -> float:
    run()  # compile + warm up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def baseline(decoder: Decoder, batch: dict, steps: int) -> float:
    graphdef, norms, rest = nnx.split(decoder, lambda path, _: path[-1] == "attn_norm" and "layers" in path, ...)

    @jax.jit
    def step(norms, rest, batch):
        def loss(norms):
            model = nnx.merge(graphdef, norms, rest)
            hidden, _ = model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
            return masked_mean(token_cross_entropy(model, hidden, batch["targets"]), batch["loss_mask"])
        return jax.value_and_grad(loss)(norms)

    device_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    return time_steps(lambda: jax.block_until_ready(step(norms, rest, device_batch)), steps)


def koff(decoder: Decoder, num_domains: int, batch: dict, steps: int) -> float:
    trainer = KoffTrainer(decoder, KoffConfig(num_domains=num_domains, memory_init="random"))
    box = {"state": trainer.init()}

    def run():
        box["state"], metrics = trainer.train_step(box["state"], batch)
        float(metrics["loss"])

    return time_steps(run, steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--domains", default="8,512", help="comma-separated memory table sizes")
    args = parser.parse_args()
    cfg = preset("gemma-3-270m")
    decoder = Decoder(cfg, rngs=nnx.Rngs(0))
    tokens = args.batch * args.seq
    kcfg = KoffConfig(num_domains=1)
    print(f"Gemma-3-270M random init, float32, {jax.devices()[0].platform}, batch {args.batch} x {args.seq}; "
          f"KOFF: M={kcfg.memory_slots} KV slots, LoRA r={kcfg.lora_rank} on {kcfg.lora_targets}; "
          f"median of {args.steps} steps")
    rows = [("frozen forward+backward", baseline(decoder, make_batch(cfg, args.batch, args.seq, 1), args.steps),
             peak_rss_gib())]
    for d in (int(x) for x in args.domains.split(",")):
        rows.append((f"KOFF step, D={d}", koff(decoder, d, make_batch(cfg, args.batch, args.seq, d), args.steps),
                     peak_rss_gib()))
    base = rows[0][1]
    print(f"| {'step':<26} | {'s/step':>7} | {'tokens/s':>9} | {'vs baseline':>11} | {'peak RSS GiB':>12} |")
    print(f"|{'-' * 28}|{'-' * 9}|{'-' * 11}|{'-' * 13}|{'-' * 14}|")
    for name, seconds, rss in rows:
        print(f"| {name:<26} | {seconds:7.2f} | {tokens / seconds:9.0f} | {seconds / base:10.2f}x | {rss:12.2f} |")


if __name__ == "__main__":
    main()
