"""Accelerator throughput suite: forward, KOFF train step and serving; tokens/s, MFU, peak device memory.

    python benchmarks/accelerator.py --out results/accelerator [--models gemma-3-270m,llama-3.2-1b]
    python benchmarks/accelerator.py --tiny --dtype float32 --out /tmp/smoke   # CPU smoke test

Models are random-initialised presets (throughput does not depend on the weights' values;
no download needed on the accelerator host). Each (model, workload) runs in its own
process (`workers.py`), so the peak device memory (the allocator's `peak_bytes_in_use`;
peak RSS on CPU) is that workload's own; workloads run one after another, never
concurrently, so each has the device to itself. Workloads:
- `forward/hidden`, `forward/lm_loss`: a jitted forward to the final hidden states, and
  with the chunked next-token loss;
- `train/remat=R`: the KOFF train step (gates, 16 KV slots, LoRA r=8 on all projections,
  8 domains) in `--dtype` compute with decoder rematerialisation R (by default none, `dots`,
  which is `KoffConfig`'s default, and full);
- `serve/prefill`, `serve/decode`: a prompt's prefill and one decode step of the dense
  backbone with per-example domain memory (the generation's own jitted step).
Every workload runs once per `--attention` kernel (`ModelConfig.attention_impl`), so kernels
compare side by side. A workload that fails (out of memory, a compile error, a crash) becomes
a row saying so and the suite goes on; so does one left when `--budget` seconds are spent.
The report is rewritten after every row, so a suite stopped early keeps what it measured.
MFU = analytic model FLOPs (`sparsemem.scale.flops`, no rematerialisation) per second /
peak: the vendor's dense peak for `--dtype` on GPU/TPU, a float32 matmul probe on CPU.
Writes `accelerator.json` and `accelerator.md` under `--out`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

import hardware
import workers

ALL_PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


def model_config(name: str, tiny: bool):
    from sparsemem.models.config import preset

    cfg = preset(name)
    if tiny:  # the same architecture family at smoke-test size
        cfg = cfg.replace(num_layers=2, d_model=64, d_ff=128, num_heads=2, num_kv_heads=1, head_dim=32,
                          vocab_size=512)
    return cfg


def koff_config(dtype: str, remat: str):
    from sparsemem.koff.config import KoffConfig

    return KoffConfig(num_domains=8, memory_init="random", memory_slots=16, lora_rank=8, lora_targets=ALL_PROJECTIONS,
                      compute_dtype=dtype, remat=remat)


def forward_step(cfg, dtype, batch: int, seq: int, with_loss: bool):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sparsemem.models.decoder import Decoder
    from sparsemem.models.loss import token_cross_entropy

    model = Decoder(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=dtype)
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, seq + 1)), jnp.int32)

    @jax.jit
    def run(state, tokens):
        model = nnx.merge(graphdef, state)
        hidden, _ = model(tokens[:, :-1])
        return token_cross_entropy(model, hidden, tokens[:, 1:]).mean() if with_loss else hidden

    return lambda: jax.block_until_ready(run(state, tokens))


def train_step(cfg, dtype: str, batch: int, seq: int, remat: str):
    from flax import nnx

    from sparsemem.models.decoder import Decoder
    from train_step import koff_step, make_batch

    kcfg = koff_config(dtype, remat)
    return koff_step(Decoder(cfg, rngs=nnx.Rngs(0)), kcfg, make_batch(cfg, batch, seq, kcfg.num_domains))


def serve_step(cfg, dtype, batch: int, prompt: int, phase: str):
    """A step that times itself: one prefill of `prompt` tokens, or the median of 3 decode steps after it."""
    from flax import nnx

    from serve import DOMAINS, Runner, random_table
    from sparsemem.models.decoder import Decoder
    from sparsemem.serve.compaction import CompactLayout, compact_decoder
    from sparsemem.serve.memory import MemoryBank

    layout = CompactLayout.full(cfg)
    model = compact_decoder(Decoder(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=dtype), layout)
    bank = MemoryBank(cfg, layout, DOMAINS, random_table(cfg, 16, 8), 2.0)
    runner = Runner(model, bank, batch, prompt, 4)
    if phase == "prefill":
        return lambda: runner.run(0)[0]
    return lambda: statistics.median(runner.run(3)[1])


def child(args) -> None:
    import jax.numpy as jnp

    cfg = model_config(args.model, args.tiny).replace(attention_impl=args.attention)
    dtype, kind = jnp.dtype(args.dtype), args.child
    with workers.errors_reported():
        if kind.startswith("forward/"):
            step = forward_step(cfg, dtype, args.batch, args.seq, kind == "forward/lm_loss")
        elif kind.startswith("train/remat="):
            step = train_step(cfg, args.dtype, args.batch, args.seq, kind.split("=")[1])
        else:
            step = serve_step(cfg, dtype, args.serve_batch, args.prompt, kind.split("/")[1])
        workers.serve(step, {})


def model_flops(cfg, args, kind: str) -> tuple[int, int]:
    """(tokens, analytic model FLOPs) of one step of workload `kind`."""
    from sparsemem.scale import flops

    if kind.startswith("forward/"):
        return args.batch * args.seq, flops.forward_flops(cfg, args.batch, args.seq, logits=kind == "forward/lm_loss")
    if kind.startswith("train/"):
        return args.batch * args.seq, flops.train_step_flops(cfg, koff_config(args.dtype, kind.split("=")[1]),
                                                             args.batch, args.seq, recompute=False)
    head = 2 * args.serve_batch * cfg.d_model * cfg.vocab_size  # logits of the last position only
    if kind == "serve/prefill":
        return args.serve_batch * args.prompt, flops.forward_flops(cfg, args.serve_batch, args.prompt,
                                                                   logits=False) + head
    return args.serve_batch, flops.forward_flops(cfg, args.serve_batch, 1, logits=False) + head


def failure(error: str) -> str:
    """What a failed workload's row says: "out of memory", or the error's first line."""
    if "RESOURCE_EXHAUSTED" in error or "out of memory" in error.lower():
        return "out of memory"
    return error.strip().splitlines()[0][:160] if error.strip() else "failed"


def measure(argv: list[str], steps: int) -> dict:
    """Median seconds per step and peak memory of one workload's child, or its `error`."""
    try:
        worker = workers.Worker(__file__, argv)
        seconds = float(np.median([worker.run() for _ in range(steps)]))
        return dict(seconds=seconds, **worker.close())
    except workers.ChildFailed as error:
        return dict(error=str(error))


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| model | workload | attention | batch x seq | s/step | tokens/s | MFU | peak memory GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        start = f"| {r['model']} | {r['workload']} | {r['attention']} | {r['shape']} |"
        if "error" in r:
            lines.append(f"{start} **{failure(r['error'])}** | - | - | - |")
        else:
            lines.append(f"{start} {r['seconds']:.4f} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | "
                         f"{r['peak_bytes'] / 2**30:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for accelerator.json and accelerator.md")
    parser.add_argument("--models", default="gemma-3-270m,llama-3.2-1b")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="compute dtype")
    parser.add_argument("--remat", default="none,dots,full",
                        help="train-step rematerialisation options (dots is KoffConfig's default)")
    parser.add_argument("--attention", default="auto",
                        help="attention kernels (ModelConfig.attention_impl: auto, xla, cudnn), one run of every "
                             "workload each")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--serve-batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--workloads", default="forward/hidden,forward/lm_loss,train,serve/prefill,serve/decode",
                        help="subset to run; `train` runs one workload per --remat option")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per workload (after one warm-up); median")
    parser.add_argument("--budget", type=float,
                        help="seconds after which no further workload starts (each left is a row saying so)")
    parser.add_argument("--tiny", action="store_true", help="shrink the models to smoke-test size (CPU CI)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import jax

    from sparsemem import files
    from sparsemem.models.config import ATTENTION_IMPLS

    kinds = [kind for w in args.workloads.split(",")
             for kind in ([f"train/remat={r}" for r in args.remat.split(",")] if w == "train" else [w])]
    unknown = set(args.workloads.split(",")) - {"forward/hidden", "forward/lm_loss", "train", "serve/prefill",
                                                 "serve/decode"}
    if unknown:
        parser.error(f"unknown --workloads {sorted(unknown)}")
    kernels = args.attention.split(",")
    if set(kernels) - set(ATTENTION_IMPLS):
        parser.error(f"unknown --attention {sorted(set(kernels) - set(ATTENTION_IMPLS))}; "
                     f"choose from {', '.join(ATTENTION_IMPLS)}")
    device = jax.devices()[0]
    peak, peak_source = hardware.peak_flops(args.dtype)
    shared = ["--dtype", args.dtype, "--batch", str(args.batch), "--seq", str(args.seq), "--serve-batch",
              str(args.serve_batch), "--prompt", str(args.prompt), "--out", args.out] + (["--tiny"] if args.tiny else [])
    rows, started = [], time.perf_counter()
    report = dict(device=device.device_kind, platform=device.platform, host=platform.node(), dtype=args.dtype,
                  peak_flops=peak, peak_source=peak_source, tiny=args.tiny, rows=rows)

    def header() -> str:
        memory_kinds = sorted({r["peak_kind"] for r in rows if "peak_kind" in r}) or ["none measured"]
        return (f"{device.device_kind} ({device.platform}), {args.dtype} compute, random-init weights"
                f"{' (tiny sizes)' if args.tiny else ''}; peak {peak / 1e12:.3g} TFLOP/s ({peak_source}); "
                f"median of {args.steps} steps; memory: {', '.join(memory_kinds)}; "
                f"suite took {time.perf_counter() - started:.0f}s")

    os.makedirs(args.out, exist_ok=True)
    for name in args.models.split(","):
        cfg = model_config(name, args.tiny)
        for kind in kinds:
            for kernel in kernels:
                begin = time.perf_counter()
                if args.budget is not None and begin - started >= args.budget:
                    result = dict(error=f"not run: the suite's --budget of {args.budget:g}s was spent")
                else:
                    result = measure(["--child", kind, "--model", name, "--attention", kernel, *shared], args.steps)
                shape = (f"{args.serve_batch} x {args.prompt}" if kind.startswith("serve/")
                         else f"{args.batch} x {args.seq}")
                row = dict(model=name, workload=kind, attention=kernel, shape=shape, **result)
                rows.append(row)
                took = f"({time.perf_counter() - begin:.0f}s)"
                if "error" in result:
                    print(f"{name} {kind} {kernel}: FAILED, {failure(result['error'])} {took}", flush=True)
                else:
                    tokens, flop = model_flops(cfg, args, kind)
                    row.update(tokens_per_s=tokens / row["seconds"], model_flops=flop,
                               mfu=flop / row["seconds"] / peak)
                    print(f"{name} {kind} {kernel}: {row['seconds']:.4f} s/step, {row['tokens_per_s']:,.0f} "
                          f"tokens/s, MFU {100 * row['mfu']:.1f}% {took}", flush=True)
                # Written after every row: a suite stopped early keeps what it measured.
                files.write_json(os.path.join(args.out, "accelerator.json"), report)
                files.atomic_write(os.path.join(args.out, "accelerator.md"),
                                   lambda tmp: tmp.write_text(markdown(rows, header())))
    print(markdown(rows, header()))

if __name__ == "__main__":
    main()
