"""Speed, FLOP/s and memory of the KOFF train step next to a plain frozen forward+backward.

    python benchmarks/train_step.py [--batch 4 --seq 256 --rounds 3 --domains 8 --remat none,dots --against REV]

Model: the embedded Gemma-3-270M (float32). The baseline is the same decoder's forward
and backward through all activations (gradient w.r.t. its per-layer attention-norm
weights, whose weight gradient costs nothing), i.e. what any method that trains inside
the network pays; the KOFF step adds gate sampling, KV memory, LoRA and the optimiser
updates. `--against REV` adds the KOFF step as implemented at git revision REV (its own
`sparsemem` package), to measure a change against the code before it. `--remat none,dots`
adds a row per rematerialisation policy (at the first --domains; --against uses the first).

Every variant runs in its own process (`workers.py`); steps are timed in alternating
rounds and the median is kept. GFLOP/s are model FLOPs (`sparsemem.scale.flops`: the
KOFF step without rematerialisation; the baseline as 2x the forward with logits) per
second; % of peak divides by a float32 matmul probe run in the same session.
"""

from __future__ import annotations

import argparse

import numpy as np

import hardware
import workers

ALL_PROJECTIONS = "q,k,v,o,gate,up,down"


def make_batch(cfg, batch: int, seq: int, num_domains: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, cfg.vocab_size, (batch, seq + 1))
    return dict(inputs=toks[:, :-1], targets=toks[:, 1:], loss_mask=np.ones((batch, seq), np.float32),
                segment_ids=np.ones((batch, seq), np.int32), positions=np.tile(np.arange(seq), (batch, 1)),
                domain=rng.integers(0, num_domains, batch))


def koff_config(args, num_domains: int, remat: str):
    from sparsemem.koff.config import KoffConfig

    return KoffConfig(num_domains=num_domains, memory_init="random", memory_slots=args.slots, lora_rank=args.rank,
                      lora_targets=tuple(args.lora_targets.split(",")), remat=remat)


def baseline_step(decoder, batch: dict):
    """A compiled frozen forward+backward (see module docstring)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sparsemem.models.loss import masked_mean, token_cross_entropy

    graphdef, norms, rest = nnx.split(decoder, lambda path, _: path[-1] == "attn_norm" and "layers" in path, ...)

    @jax.jit
    def step(norms, rest, batch):
        def loss(norms):
            model = nnx.merge(graphdef, norms, rest)
            hidden, _ = model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
            return masked_mean(token_cross_entropy(model, hidden, batch["targets"]), batch["loss_mask"])
        return jax.value_and_grad(loss)(norms)

    device_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    return lambda: jax.block_until_ready(step(norms, rest, device_batch))


def koff_step(decoder, kcfg, batch: dict):
    """A compiled KOFF train step; each call updates the state."""
    from sparsemem.train import KoffTrainer

    trainer = KoffTrainer(decoder, kcfg)
    box = {"state": trainer.init()}

    def run():
        box["state"], metrics = trainer.train_step(box["state"], batch)
        float(metrics["loss"])

    return run


def child(args) -> None:
    from sparsemem.checkpoints.gguf import demo_model_dir
    from sparsemem.checkpoints.hf import load_hf_checkpoint

    decoder = load_hf_checkpoint(demo_model_dir())
    domains = 1 if args.child == "baseline" else args.child_domains
    batch = make_batch(decoder.cfg, args.batch, args.seq, domains)
    step = baseline_step(decoder, batch) if args.child == "baseline" else koff_step(
        decoder, koff_config(args, domains, args.remat), batch)
    workers.serve(step, {})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per variant (interleaved)")
    parser.add_argument("--domains", default="8", help="comma-separated memory table sizes")
    parser.add_argument("--slots", type=int, default=16, help="KV memory slots")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--lora-targets", default=ALL_PROJECTIONS)
    parser.add_argument("--remat", default="dots", help="comma-separated decoder remat policies (none, full, dots)")
    parser.add_argument("--against", help="also time the KOFF step (first --domains) of this git revision")
    parser.add_argument("--no-baseline", action="store_true", help="skip the frozen forward+backward")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-domains", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from sparsemem.models.config import preset
    from sparsemem.scale import flops

    cfg = preset("gemma-3-270m")
    peak, peak_source = hardware.peak_flops("float32")
    shape = ["--batch", str(args.batch), "--seq", str(args.seq), "--slots", str(args.slots), "--rank", str(args.rank),
             "--lora-targets", args.lora_targets]
    domains = [int(d) for d in args.domains.split(",")]
    remats = args.remat.split(",")
    unknown = set(remats) - {"none", "full", "dots"}
    if unknown:
        parser.error(f"--remat {sorted(unknown)}: choose from none, full, dots")
    first_remat = remats[0]
    # (row name, worker kind, domains, remat, package path or None for this checkout)
    variants = [] if args.no_baseline else [("frozen forward+backward", "baseline", domains[0], first_remat, None)]
    variants += [(f"KOFF step, D={d}", "koff", d, first_remat, None) for d in domains]
    variants += [(f"KOFF step, D={domains[0]}, remat {r}", "koff", domains[0], r, None) for r in remats[1:]]
    if args.against:
        variants.append((f"KOFF step, D={domains[0]} @{args.against}", "koff", domains[0], first_remat,
                         workers.package_at(args.against)))
    script = __file__
    procs = [workers.Worker(script, ["--child", kind, "--child-domains", str(d), "--remat", r, *shape], path)
             for _, kind, d, r, path in variants]
    times = workers.interleaved(procs, args.rounds)
    memory = [p.close() for p in procs]
    tokens = args.batch * args.seq
    print(f"Gemma-3-270M (embedded weights), float32, CPU, batch {args.batch} x {args.seq}; KOFF: "
          f"M={args.slots} KV slots, LoRA r={args.rank} on {args.lora_targets}, remat {first_remat}; median of "
          f"{args.rounds} interleaved rounds, one process per variant; peak {peak / 1e9:.0f} GFLOP/s ({peak_source})")
    print("| step | s/step | tokens/s | GFLOP/s | % of peak | vs first row | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|")
    first = None
    for (name, kind, d, remat, _), t, mem in zip(variants, times, memory):
        sec = float(np.median(t))
        first = first or sec
        model_flops = (2 * flops.forward_flops(cfg, args.batch, args.seq, logits=True) if kind == "baseline" else
                       flops.train_step_flops(cfg, koff_config(args, d, remat), args.batch, args.seq,
                                                     recompute=False))
        print(f"| {name} | {sec:.2f} | {tokens / sec:.0f} | {model_flops / sec / 1e9:.1f} | "
              f"{100 * model_flops / sec / peak:.0f}% | {first / sec:.2f}x | {mem['peak_bytes'] / 2**30:.2f} |")
    print("vs first row = first row's time / this row's time (higher is faster)")
    if args.against:
        new, old = int(not args.no_baseline), len(variants) - 1
        print(f"KOFF step at D={domains[0]}: {np.median(times[old]) / np.median(times[new]):.2f}x the speed of "
              f"{args.against}, {memory[new]['peak_bytes'] / memory[old]['peak_bytes']:.2f}x its peak memory")


if __name__ == "__main__":
    main()
