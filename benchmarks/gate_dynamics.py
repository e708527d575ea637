"""Expected sparsity against its target, per controller, on the tiny random model of the learning test.

    python benchmarks/gate_dynamics.py [--steps 300 --controllers projection,lagrangian --lambda-lr 0.2]

A 2-layer decoder (264 gates) fits one fixed batch of 4 x 16 random tokens with
gates, KV memory and LoRA trained jointly (target 0.3, ramp over the first quarter
of the steps). Prints the expected sparsity every `--every` steps, the largest gap
to the target after the ramp, the fraction of polarised gates and the train loss
under sampled gates vs under the deterministic mask at the end (docs/experiments.md,
"Gate dynamics").
"""

from __future__ import annotations

import argparse

import numpy as np
from flax import nnx

from sparsemem.koff.config import KoffConfig
from sparsemem.models.config import preset
from sparsemem.models.decoder import Decoder
from sparsemem.train import KoffTrainer

CFG = preset("gemma-3-270m").replace(num_layers=2, d_model=64, d_ff=128, num_heads=4, num_kv_heads=2, head_dim=16,
                                     vocab_size=256, sliding_window=8)


def tiny_batch(seed: int = 0) -> dict[str, np.ndarray]:
    toks = np.random.default_rng(seed).integers(0, CFG.vocab_size, (4, 17))
    return dict(inputs=toks[:, :-1], targets=toks[:, 1:], loss_mask=np.ones((4, 16)), segment_ids=np.ones((4, 16)),
                positions=np.tile(np.arange(16), (4, 1)), domain=np.array([0, 1, 0, 1]))


def trajectory(kcfg: KoffConfig) -> tuple[list[dict], dict]:
    """Per-step metrics of a joint run and the final deterministic-mask eval on the same batch."""
    trainer = KoffTrainer(Decoder(CFG, rngs=nnx.Rngs(0)), kcfg)
    state = trainer.init(np.random.default_rng(1).integers(0, CFG.vocab_size, (kcfg.num_domains, kcfg.memory_slots)))
    batch, history = tiny_batch(), []
    for _ in range(kcfg.total_steps):
        state, metrics = trainer.train_step(state, batch)
        history.append({k: float(v) for k, v in metrics.items() if np.ndim(v) == 0})
    return history, trainer.evaluate(state, [batch])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--controllers", default="projection,lagrangian")
    p.add_argument("--gate-lr", type=float, default=0.1)
    p.add_argument("--lambda-lr", type=float, default=0.2)
    args = p.parse_args()
    print("| controller | expected sparsity at steps 0, every, ... | max gap after ramp | polarised | "
          "loss sampled / deterministic |")
    print("|---|---|---|---|---|")
    for name in args.controllers.split(","):
        kcfg = KoffConfig(num_domains=2, memory_slots=8, target_sparsity=0.3, total_steps=args.steps,
                          warmup_fraction=0.25, init_keep_prob=0.9, gate_lr=args.gate_lr, lambda_lr=args.lambda_lr,
                          memory_lr=0.01, controller=name)
        history, final = trajectory(kcfg)
        s = [h["expected_sparsity"] for h in history]
        gap = max(abs(h["expected_sparsity"] - h["target"]) for h in history[kcfg.warmup_steps:])
        sampled = np.mean([h["loss"] for h in history[-10:]])
        deterministic = float(np.nanmean(final["loss_memory"]))
        print(f"| {name} | {' '.join(f'{x:.2f}' for x in s[::args.every])} | {gap:.3f} | "
              f"{history[-1]['polarised']:.2f} | {sampled:.3f} / {deterministic:.3f} |")


if __name__ == "__main__":
    main()
