"""Serving benchmark: dense vs masked vs compacted Gemma-3-270M with domain memory, and host-offloaded memory.

    python benchmarks/serve.py [--sparsity 0.5] [--prompt-len 128] [--decode-len 64] [--round-to 128]

All backbones run in the same serving engine (`CompactDecoder`, memory slots at the
front of the cache, per-row LoRA): *dense* keeps every unit, *masked* keeps every
unit with the pruned ones' output weights zeroed (what a pruned model that is not
compacted costs), *compacted* keeps only the mask's units. The mask is the
deterministic top-k mask of random gate scores at `--sparsity` (prunable params).
Ideal speed-ups: prefill from FLOPs (projections, attention over prompt + memory,
last-token logits), decode from bytes read per step (weights + KV cache), float32.
Prefill GFLOP/s are those FLOPs per second, % of peak against a float32 matmul probe
run in the same session (`hardware.py`; the vendor peak on GPU/TPU).
Variants run interleaved; times are the best of `--reps` rounds (prefill) and of the per-round
median decode step, after a warm-up, to damp the noise of other load on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import hardware
from sparsemem.checkpoints.gguf import demo_model_dir
from sparsemem.checkpoints.hf import load_hf_checkpoint
from sparsemem.koff import sparsity
from sparsemem.models.hooks import projection_shape
from sparsemem.serve.compaction import CompactLayout, compact_decoder, prunable_params, round_masks
from sparsemem.serve.generate import _step
from sparsemem.serve.memory import MemoryBank
from sparsemem.serve.sampling import SamplingConfig, SamplingRows

DOMAINS = ("en", "de", "fr", "ja")
GREEDY = SamplingConfig(max_new_tokens=1)  # the rows' settings, as data


def random_table(cfg, slots: int, rank: int, targets=("q", "v"), seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (len(DOMAINS), cfg.num_layers, slots, cfg.num_kv_heads, cfg.head_dim)
    table = {"k": rng.standard_normal(shape, np.float32), "v": rng.standard_normal(shape, np.float32)}
    for proj in targets:
        fan_in, fan_out = projection_shape(cfg, proj)
        table[f"{proj}_a"] = 0.02 * rng.standard_normal((len(DOMAINS), cfg.num_layers, fan_in, rank), np.float32)
        table[f"{proj}_b"] = 0.02 * rng.standard_normal((len(DOMAINS), cfg.num_layers, rank, fan_out), np.float32)
    return table


def masked_engine(decoder, layout: CompactLayout):
    """Full widths, pruned heads' `o` rows and pruned neurons' `down` rows zeroed: the masked model's cost."""
    masks = layout.masks(decoder.cfg)
    graphdef, state = nnx.split(decoder)
    copy = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
    copy.layers.wo[...] = copy.layers.wo[...] * masks["head"][:, :, None, None]
    copy.layers.w_down[...] = copy.layers.w_down[...] * masks["neuron"][:, :, None]
    return compact_decoder(copy, CompactLayout.full(decoder.cfg))


def cost(model, layout: CompactLayout, batch: int, prompt: int, cache_len: int, slots: int) -> tuple[float, float]:
    """(prefill FLOPs, decode bytes per step) of a serving model."""
    cfg = model.cfg
    proj = prunable_params(model)
    heads = sum(len(h) for h in layout.heads)
    kv = sum(len(k) for k in layout.kv_heads)
    attn = 4 * batch * prompt * (prompt / 2 + slots) * heads * cfg.head_dim
    flops = 2 * batch * prompt * proj + attn + 2 * batch * cfg.d_model * cfg.vocab_size
    bytes_ = 4 * (proj + cfg.vocab_size * cfg.d_model) + 4 * 2 * batch * (cache_len + slots) * kv * cfg.head_dim
    return flops, bytes_


class Runner:
    """Times prefill and decode steps of one serving model at one batch size (generation's own jitted step)."""

    def __init__(self, model, bank: MemoryBank, batch: int, prompt_len: int, decode_len: int):
        names = [DOMAINS[i % len(DOMAINS)] for i in range(batch)]
        self.model, self.batch, self.total = model, batch, prompt_len + decode_len
        self.memory = bank.rows(names)
        self.graphdef, self.state = nnx.split(model)
        self.tokens = jnp.asarray(np.random.default_rng(0).integers(3, 1000, (batch, prompt_len)), jnp.int32)
        self.inputs, self.settings = {"memory": self.memory}, SamplingRows.of([GREEDY] * batch)
        self.step = np.zeros(batch, np.int32)
        self.ones = jnp.ones((batch, 1), jnp.int32)
        self.run(2)  # compile prefill and decode

    def run(self, steps: int, during=None) -> tuple[float, list[float]]:
        """Seconds of one prefill and of each of `steps` decode steps after it.

        `during()` (if given) is dispatched right after each decode step and waited for with it.
        """
        cache = self.model.init_cache(self.batch, self.total, self.memory)
        jax.block_until_ready(cache)
        start = time.perf_counter()
        picked, cache = _step(self.graphdef, self.state, self.tokens, jnp.ones_like(self.tokens), cache, self.inputs,
                              self.settings, self.step)
        jax.block_until_ready(picked)
        prefill, decode = time.perf_counter() - start, []
        for _ in range(steps):
            start = time.perf_counter()
            picked, cache = _step(self.graphdef, self.state, picked.ids[:, None], self.ones, cache, self.inputs,
                                  self.settings, self.step)
            jax.block_until_ready((picked, during() if during else None))
            decode.append(time.perf_counter() - start)
        return prefill, decode


def min_time(fn, reps: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.5, help="target sparsity over prunable params")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-len", type=int, default=16)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--round-to", type=int, default=0, help="also benchmark widths rounded to this multiple")
    parser.add_argument("--reps", type=int, default=4)
    args = parser.parse_args()

    decoder = load_hf_checkpoint(demo_model_dir())
    cfg = decoder.cfg
    keys = jax.random.split(jax.random.key(0), 2)
    log_alphas = {"head": 2 * jax.random.normal(keys[0], (cfg.num_layers, cfg.num_heads)),
                  "neuron": 2 * jax.random.normal(keys[1], (cfg.num_layers, cfg.d_ff))}
    masks = jax.tree.map(np.asarray, sparsity.deterministic_masks(cfg, log_alphas, args.sparsity))
    realised = float(sparsity.sparsity(cfg, sparsity.remaining_params(cfg, masks)))
    realised_all = float(sparsity.sparsity(cfg, sparsity.remaining_params(cfg, masks), "all"))
    table = random_table(cfg, args.slots, args.rank)
    full, pruned = CompactLayout.full(cfg), CompactLayout.from_masks(cfg, masks)
    variants = {"dense": (compact_decoder(decoder, full), full), "masked": (masked_engine(decoder, pruned), full),
                "compacted": (compact_decoder(decoder, pruned), pruned)}
    if args.round_to:
        scores = {k: np.asarray(v) for k, v in sparsity.keep_probs(log_alphas).items()}
        rounded = CompactLayout.from_masks(cfg, round_masks(cfg, masks, scores, args.round_to))
        variants[f"compacted/{args.round_to}"] = (compact_decoder(decoder, rounded), rounded)
    print(f"# Gemma-3-270M (float32, {jax.devices()[0].platform}), memory: {args.slots} KV slots + LoRA r={args.rank} "
          f"on q,v; mask sparsity {realised:.3f} of prunable params ({realised_all:.3f} of all); "
          f"prompt {args.prompt_len}, decode steps timed at cache {args.prompt_len}..{args.prompt_len + args.decode_len}")
    peak, peak_source = hardware.peak_flops("float32")
    print(f"# peak {peak / 1e9:.0f} GFLOP/s ({peak_source})")
    print("| backbone | batch | prefill tok/s | prefill GFLOP/s | % of peak | ideal x | measured x | % of ideal "
          "| decode tok/s | ideal x | measured x | % of ideal |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    banks = {name: MemoryBank(cfg, layout, DOMAINS, table, 2.0) for name, (_, layout) in variants.items()}
    for batch in (int(b) for b in args.batches.split(",")):
        runners = {name: Runner(model, banks[name], batch, args.prompt_len, args.decode_len)
                   for name, (model, _) in variants.items()}
        best = {name: [float("inf"), float("inf")] for name in variants}
        for _ in range(args.reps):  # variants interleaved, so load from other processes hits them alike
            for name, runner in runners.items():
                prefill, decode = runner.run(args.decode_len - 2)
                best[name] = [min(best[name][0], prefill), min(best[name][1], statistics.median(decode))]
        base = None
        for name, (model, layout) in variants.items():
            t_pre, t_dec = best[name]
            flops, bytes_ = cost(model, layout, batch, args.prompt_len, args.prompt_len + args.decode_len // 2,
                                 args.slots)
            base = base or (t_pre, t_dec, flops, bytes_)
            ideal_p, ideal_d = base[2] / flops, base[3] / bytes_
            got_p, got_d = base[0] / t_pre, base[1] / t_dec
            print(f"| {name} | {batch} | {batch * args.prompt_len / t_pre:,.0f} | {flops / t_pre / 1e9:.1f} | "
                  f"{100 * flops / t_pre / peak:.0f}% | {ideal_p:.2f} | {got_p:.2f} | "
                  f"{100 * got_p / ideal_p:.0f}% | {batch / t_dec:,.1f} | {ideal_d:.2f} | {got_d:.2f} | "
                  f"{100 * got_d / ideal_d:.0f}% |", flush=True)
        del runners

    # Host-offloaded vs on-device memory table: the rows a batch of 8 needs, alone and while a decode step runs
    # (a server fetches the next batch's rows during the current batch's steps).
    layout = variants["compacted"][1]
    names = [DOMAINS[i % len(DOMAINS)] for i in range(8)]
    banks["compacted/host"] = MemoryBank(cfg, layout, DOMAINS, table, 2.0, offload=True)
    runner = Runner(variants["compacted"][0], banks["compacted"], 8, args.prompt_len, args.decode_len)
    alone = {name: min_time(lambda b=banks[name]: b.rows(names), 10) for name in ("compacted", "compacted/host")}
    steps = {name: [] for name in (None, "compacted", "compacted/host")}
    for _ in range(args.reps):
        for name in steps:
            during = (lambda b=banks[name]: b.rows(names)) if name else None
            steps[name] += runner.run(args.decode_len - 2, during)[1]
    base = statistics.median(steps[None])
    extra = alone["compacted/host"] - alone["compacted"]
    print(f"\n# memory rows for a batch of 8 ({len(set(names))} domains); compacted decode step, batch 8: "
          f"median {1e3 * base:.1f} ms")
    print("| table | memory kind | fetch alone ms | decode step with a concurrent fetch ms |")
    print("|---|---|---|---|")
    for name, label in (("compacted", "on device"), ("compacted/host", "host-offloaded")):
        print(f"| {label} | {banks[name].layers[0]['k'].sharding.memory_kind} | {1e3 * alone[name]:.2f} | "
              f"{1e3 * statistics.median(steps[name]):.1f} |")
    print(f"host-offloaded minus on-device fetch: {1e3 * extra:.2f} ms = {100 * extra / base:.2f}% of a decode step "
          f"if fetched every step; rows are fetched once per request, i.e. {100 * extra / base / args.decode_len:.3f}% "
          f"per step over {args.decode_len} steps")


if __name__ == "__main__":
    main()
