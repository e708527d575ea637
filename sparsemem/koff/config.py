"""Hyper-parameters of a KOFF run (gates, sparsity constraint, memory table, optimiser)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from sparsemem.models.hooks import PROJECTIONS


@dataclasses.dataclass(frozen=True)
class KoffConfig:
    """Everything KOFF adds on top of a frozen decoder; `ModelConfig` describes the decoder."""

    num_domains: int
    # Sparsity constraint: the target is reached linearly over the first
    # `warmup_fraction * total_steps` steps and measured over `sparsity_over` params.
    target_sparsity: float = 0.12
    sparsity_over: Literal["prunable", "all"] = "prunable"
    total_steps: int = 1000
    warmup_fraction: float = 0.3
    # The gates train for the first `gate_fraction * total_steps` steps; after that the mask
    # is frozen to the deterministic top-k at the target and only the memory trains under it
    # (prune, then retrain: the memory learns to compensate for exactly the units removed).
    gate_fraction: float = 1.0
    block_gates: bool = False  # also gate whole attention / MLP blocks per layer
    init_keep_prob: float = 0.99  # P(unit kept) at initialisation: "almost surely kept"
    init_jitter: float = 0.01  # std of random noise on the initial log_alpha (no two units start tied)
    # How the expected sparsity follows its schedule (sparsemem/koff/controller.py, docs/experiments.md):
    # "projection" shifts each unit type's log_alpha after every gate step so it is exactly on
    # target; "lagrangian" adds the multiplier penalty to the gates' gradient (Louizos et al.).
    controller: Literal["projection", "lagrangian"] = "projection"
    log_alpha_clamp: float = 5.0  # |log_alpha| bound; at 5, P(z = 1) = 0.97 and P(z > 0) = 0.03 at the ends
    # Polarisation (projection controller): over the last `polarise_fraction` of the gate steps every
    # log_alpha is multiplied by a constant factor per step, `polarise_growth` in all, before the
    # projection: the order the gates learned is kept while they go to the clamp ends, so the mask
    # training sees becomes the crisp 0/1 mask that is evaluated (docs/experiments.md).
    polarise_fraction: float = 0.2
    polarise_growth: float = 100.0
    # Memory table: M KV slots per layer and KV head, LoRA of rank r on `lora_targets`.
    memory_slots: int = 16
    memory_init: Literal["prefill", "random"] = "prefill"
    memory_init_std: float = 1.0  # std of randomly initialised memory keys/values
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q", "v")
    # Objective and optimisation.
    kl_weight: float = 0.0
    loss_chunk: int = 1024  # tokens per chunk of the CE/KL losses (bounds [chunk, V] logits)
    gate_lr: float = 0.05
    memory_lr: float = 1e-3
    lambda_lr: float = 0.05
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    accum_steps: int = 1
    compute_dtype: Literal["float32", "bfloat16"] = "float32"  # trainables stay float32
    # Decoder layer rematerialisation. "dots" keeps the weight products' outputs and recomputes the
    # rest (+3.6% FLOPs): on the 2-core CPU it ran 1.13x faster than "none" at 4 x 256 with 0.66x the
    # peak memory, and brings 8 x 512 from 10 to 3 GiB of XLA temporaries (README, Benchmarks).
    remat: Literal["none", "full", "dots"] = "dots"
    seed: int = 0

    def __post_init__(self):
        problems = []
        if self.num_domains < 1:
            problems.append(f"num_domains={self.num_domains} must be >= 1")
        if not 0.0 <= self.target_sparsity < 1.0:
            problems.append(f"target_sparsity={self.target_sparsity} must be in [0, 1)")
        if self.sparsity_over not in ("prunable", "all"):
            problems.append(f"sparsity_over={self.sparsity_over!r} must be 'prunable' or 'all'")
        if not 0.0 <= self.warmup_fraction <= 1.0:
            problems.append(f"warmup_fraction={self.warmup_fraction} must be in [0, 1]")
        if not 0.0 < self.gate_fraction <= 1.0:
            problems.append(f"gate_fraction={self.gate_fraction} must be in (0, 1]")
        if not 0.0 < self.init_keep_prob < 1.0:
            problems.append(f"init_keep_prob={self.init_keep_prob} must be in (0, 1)")
        if self.controller not in ("projection", "lagrangian"):
            problems.append(f"controller={self.controller!r} must be 'projection' or 'lagrangian'")
        if not self.log_alpha_clamp > 4.0:
            problems.append(f"log_alpha_clamp={self.log_alpha_clamp} must be > 4 (the gates must be able to "
                            "reach P(z = 1) > 0.9 and P(z > 0) < 0.1)")
        if not 0.0 <= self.polarise_fraction <= 1.0:
            problems.append(f"polarise_fraction={self.polarise_fraction} must be in [0, 1]")
        if self.polarise_growth < 1.0:
            problems.append(f"polarise_growth={self.polarise_growth} must be >= 1")
        if self.init_jitter < 0:
            problems.append(f"init_jitter={self.init_jitter} must be >= 0")
        if self.memory_slots < 0 or self.lora_rank < 0:
            problems.append("memory_slots and lora_rank must be >= 0")
        if self.lora_targets and self.lora_rank == 0:
            problems.append(f"lora_targets={self.lora_targets} need lora_rank > 0 (or set lora_targets=())")
        unknown = set(self.lora_targets) - set(PROJECTIONS)
        if unknown:
            problems.append(f"unknown lora_targets {sorted(unknown)}; choose from {PROJECTIONS}")
        if self.memory_init not in ("prefill", "random"):
            problems.append(f"memory_init={self.memory_init!r} must be 'prefill' or 'random'")
        if self.accum_steps < 1 or self.total_steps < 1:
            problems.append("accum_steps and total_steps must be >= 1")
        if self.compute_dtype not in ("float32", "bfloat16"):
            problems.append(f"compute_dtype={self.compute_dtype!r} must be 'float32' or 'bfloat16'")
        if self.remat not in ("none", "full", "dots"):
            problems.append(f"remat={self.remat!r} must be 'none', 'full' or 'dots'")
        if problems:
            raise ValueError("Invalid KoffConfig: " + "; ".join(problems))

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup_fraction * self.total_steps))

    @property
    def gate_steps(self) -> int:
        """Steps in which the gates train (at least 1); the mask is frozen after them."""
        return max(1, int(round(self.gate_fraction * self.total_steps)))

    @property
    def lora_scale(self) -> float:
        """Multiplier of every LoRA delta of this run (see `lora_scale`)."""
        return lora_scale(self.lora_alpha, self.lora_rank)

    @property
    def polarise_steps(self) -> int:
        """The last gate steps, in which the gates are driven to the clamp ends."""
        return int(round(self.polarise_fraction * self.gate_steps))

    @property
    def has_memory(self) -> bool:
        return self.memory_slots > 0 or self.lora_rank > 0

    def replace(self, **changes: Any) -> "KoffConfig":
        return dataclasses.replace(self, **changes)


def lora_scale(alpha: float, rank: int) -> float:
    """Multiplier of every LoRA delta `x @ a @ b`: `alpha / rank` (1 when there is no adapter, rank 0)."""
    return alpha / rank if rank else 1.0
