"""Hyper-parameters of a KOFF run (gates, sparsity constraint, memory table, optimiser)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from sparsemem.koff import gates as gates_lib
from sparsemem.models.hooks import PROJECTIONS


@dataclasses.dataclass(frozen=True)
class KoffConfig:
    """Everything KOFF adds on top of a frozen decoder; `ModelConfig` describes the decoder."""

    num_domains: int
    # Sparsity constraint: the target is reached linearly over the first
    # `warmup_fraction * gate_steps` steps and measured over `sparsity_over` params.
    target_sparsity: float = 0.12
    sparsity_over: Literal["prunable", "all"] = "prunable"
    total_steps: int = 1000
    warmup_fraction: float = 0.3
    # The gates train for the first `gate_fraction * total_steps` steps; after that the mask
    # is frozen to the deterministic top-k at the target and only the memory trains under it
    # (prune, then retrain: the memory learns to compensate for exactly the units removed).
    gate_fraction: float = 1.0
    # Whether the memories take part while the gates train. False is prune-then-memory: the gate
    # steps learn the mask without memories, the steps after them train only the memories under it.
    joint: bool = True
    block_gates: bool = False  # also gate whole attention / MLP blocks per layer
    init_keep_prob: float = 0.99  # P(unit kept) at initialisation: "almost surely kept"
    init_jitter: float = 0.01  # std of random noise on the initial log_alpha (no two units start tied)
    # Where the gates start (sparsemem/koff/importance.py): "uniform", every unit at `init_keep_prob`
    # plus jitter; or "importance", log_alpha spread by each unit's rank in a one-shot Taylor score
    # (the score mask's, on the same calibration batches) over `importance_spread`, centred on the
    # uniform start. Its deterministic mask is the score mask, so learning moves from a good mask
    # instead of from a tie.
    gate_init: Literal["uniform", "importance"] = "uniform"
    importance_spread: float = 4.0
    # Independent hard-concrete samples per step; example i of a batch uses sample i % gate_samples
    # (more samples lower the variance of the gates' gradient at no extra matmul cost).
    gate_samples: int = 1
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
    # peak memory, and brings 8 x 512 from 10 to 3 GiB of XLA temporaries (docs/benchmarks.md).
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
        if self.gate_init not in ("uniform", "importance"):
            problems.append(f"gate_init={self.gate_init!r} must be 'uniform' or 'importance'")
        top = gates_lib.log_alpha_for(self.init_keep_prob) + self.importance_spread / 2
        if not (self.importance_spread > 0 and top <= self.log_alpha_clamp + 1e-6):
            problems.append(f"importance_spread={self.importance_spread} must be > 0 and put the best unit's start "
                            f"({top:.2f}) inside log_alpha_clamp={self.log_alpha_clamp}, or the clamp ties the "
                            "units' order")
        if self.gate_samples < 1:
            problems.append(f"gate_samples={self.gate_samples} must be >= 1")
        if self.gate_lr < 0:
            problems.append(f"gate_lr={self.gate_lr} must be >= 0 (0: the gates stay at their start)")
        if not self.joint and self.gate_fraction == 1.0 and self.has_memory:
            problems.append("joint=False trains the memories only after the gate steps; set gate_fraction < 1 "
                            "(e.g. 0.5: half the steps prune, half train the memories)")
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
        """Gate steps over which the sparsity target ramps up."""
        return int(round(self.warmup_fraction * self.gate_steps))

    @property
    def gate_steps(self) -> int:
        """Steps in which the gates train; the mask is frozen after them. None at `gate_lr` 0 (frozen gates:
        every step trains the memories under the starting gates' deterministic mask)."""
        if self.gate_lr == 0:
            return 0
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
