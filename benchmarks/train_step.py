"""Speed and memory of the KOFF train step next to a plain frozen forward+backward.

    python benchmarks/train_step.py [--batch 4 --seq 256 --rounds 3 --domains 8,512]

Model: Gemma-3-270M with random weights (speed does not depend on the values),
float32. The baseline is the same decoder's forward and backward through all
activations (gradient w.r.t. its per-layer attention-norm weights, whose weight
gradient costs nothing), i.e. what any method that trains inside the network pays;
the KOFF step adds gate sampling, KV memory, LoRA and the optimiser updates.
Steps are timed in alternating rounds (median) so a busy machine's load drifts
affect all variants alike. Prints seconds/step, tokens/s, the overhead ratio and
the process's peak host RSS after building each variant (built in table order).
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


def interleaved_medians(runners: list, rounds: int) -> list[float]:
    """Median seconds per call of each runner, timed in alternating rounds so load drifts hit all alike."""
    times = [[] for _ in runners]
    for _ in range(rounds):
        for run, out in zip(runners, times):
            start = time.perf_counter()
            run()
            out.append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def baseline(decoder: Decoder, batch: dict):
    """A compiled, warmed-up frozen forward+backward (see module docstring)."""
    graphdef, norms, rest = nnx.split(decoder, lambda path, _: path[-1] == "attn_norm" and "layers" in path, ...)

    @jax.jit
    def step(norms, rest, batch):
        def loss(norms):
            model = nnx.merge(graphdef, norms, rest)
            hidden, _ = model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
            return masked_mean(token_cross_entropy(model, hidden, batch["targets"]), batch["loss_mask"])
        return jax.value_and_grad(loss)(norms)

    device_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    run = lambda: jax.block_until_ready(step(norms, rest, device_batch))  # noqa: E731
    run()
    return run


def koff(decoder: Decoder, num_domains: int, batch: dict):
    """A compiled, warmed-up KOFF train step with a table of `num_domains` rows."""
    trainer = KoffTrainer(decoder, KoffConfig(num_domains=num_domains, memory_init="random"))
    box = {"state": trainer.init()}

    def run():
        box["state"], metrics = trainer.train_step(box["state"], batch)
        float(metrics["loss"])

    run()
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per variant (interleaved)")
    parser.add_argument("--domains", default="8,512", help="comma-separated memory table sizes")
    args = parser.parse_args()
    cfg = preset("gemma-3-270m")
    decoder = Decoder(cfg, rngs=nnx.Rngs(0))
    tokens = args.batch * args.seq
    kcfg = KoffConfig(num_domains=1)
    print(f"Gemma-3-270M random init, float32, {jax.devices()[0].platform}, batch {args.batch} x {args.seq}; "
          f"KOFF: M={kcfg.memory_slots} KV slots, LoRA r={kcfg.lora_rank} on {kcfg.lora_targets}; "
          f"median of {args.rounds} interleaved rounds")
    names, runners, rss = ["frozen forward+backward"], [baseline(decoder, make_batch(cfg, args.batch, args.seq, 1))], []
    rss.append(peak_rss_gib())
    for d in (int(x) for x in args.domains.split(",")):
        names.append(f"KOFF step, D={d}")
        runners.append(koff(decoder, d, make_batch(cfg, args.batch, args.seq, d)))
        rss.append(peak_rss_gib())
    seconds = interleaved_medians(runners, args.rounds)
    print(f"| {'step':<26} | {'s/step':>7} | {'tokens/s':>9} | {'vs baseline':>11} | {'peak RSS GiB (so far)':>21} |")
    print(f"|{'-' * 28}|{'-' * 9}|{'-' * 11}|{'-' * 13}|{'-' * 23}|")
    for name, sec, mem in zip(names, seconds, rss):
        print(f"| {name:<26} | {sec:7.2f} | {tokens / sec:9.0f} | {sec / seconds[0]:10.2f}x | {mem:21.2f} |")


if __name__ == "__main__":
    main()
