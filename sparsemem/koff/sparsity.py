"""Parameter accounting for structured pruning, the sparsity target and the Lagrangian.

Ownership of prunable parameters (DESIGN.md §1.4):
- a query head owns its `q` rows and `o` columns (plus its q bias): `2*d*Dh (+Dh)`;
- a KV head owns its `k`/`v` rows (plus biases) and goes only when *every* query
  head of its group goes;
- an MLP neuron owns its gate, up and down weights: `3*d`.
Norms and embeddings are never pruned; they count only in sparsity over all params.
With gates independent, P(KV head kept) = 1 - prod_group(1 - P(head kept)).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sparsemem.koff import gates as gates_lib
from sparsemem.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    """Per-unit parameter costs and totals of one decoder config, as exact Python ints.

    Totals pass 2**31 from ~3B parameters on, and a Python int past int32 cannot meet a
    jnp value (OverflowError at trace time), so jnp arithmetic takes counts through
    `float()` (a weakly typed scalar that takes the array's float dtype).
    """

    head: int
    kv_head: int
    neuron: int
    prunable: int
    total: int

    @classmethod
    def of(cls, cfg: ModelConfig) -> "ParamCounts":
        d, dh, L = cfg.d_model, cfg.head_dim, cfg.num_layers
        head = 2 * d * dh + (dh if cfg.qkv_bias else 0)
        kv_head = 2 * d * dh + (2 * dh if cfg.qkv_bias else 0)
        neuron = 3 * d
        prunable = L * (cfg.num_heads * head + cfg.num_kv_heads * kv_head + cfg.d_ff * neuron)
        norms_per_layer = (4 if cfg.post_norms else 2) * d + (2 * dh if cfg.qk_norm else 0)
        embeddings = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
        total = prunable + L * norms_per_layer + d + embeddings
        return cls(head=head, kv_head=kv_head, neuron=neuron, prunable=prunable, total=total)


def keep_probs(log_alphas: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {name: gates_lib.keep_prob(la) for name, la in log_alphas.items()}


def remaining_params(cfg: ModelConfig, keep: dict[str, jax.Array]) -> jax.Array:
    """Expected number of prunable params left, given per-unit keep probabilities (or 0/1 masks)."""
    counts = ParamCounts.of(cfg)
    head, neuron = keep["head"], keep["neuron"]
    attn = keep.get("attn", jnp.ones(head.shape[:1]))
    mlp = keep.get("mlp", jnp.ones(neuron.shape[:1]))
    groups = head.reshape(cfg.num_layers, cfg.num_kv_heads, cfg.group_size)
    kv = attn[:, None] * (1.0 - jnp.prod(1.0 - groups, axis=-1))
    return (float(counts.head) * jnp.sum(attn[:, None] * head) + float(counts.kv_head) * jnp.sum(kv)
            + float(counts.neuron) * jnp.sum(mlp[:, None] * neuron))


def sparsity(cfg: ModelConfig, remaining: jax.Array, over: str = "prunable") -> jax.Array:
    """Fraction of parameters removed, over the prunable params or over all params."""
    counts = ParamCounts.of(cfg)
    prunable, total = float(counts.prunable), float(counts.total)
    removed = prunable - remaining
    if over == "prunable":
        return removed / prunable
    if over == "all":
        return removed / total
    raise ValueError(f"sparsity over {over!r}: choose 'prunable' or 'all'")


def expected_sparsity(cfg: ModelConfig, log_alphas: dict[str, jax.Array], over: str = "prunable") -> jax.Array:
    return sparsity(cfg, remaining_params(cfg, keep_probs(log_alphas)), over)


def target_at(step: jax.Array, target: float, warmup_steps: int, start: float = 0.0) -> jax.Array:
    """Sparsity target at `step`: linear from `start` to `target` over `warmup_steps`, then flat.

    Start at the gates' initial expected sparsity: a ramp from 0 lies below it, so
    the controller would first push the gates the wrong way.
    """
    if warmup_steps <= 0:
        return jnp.asarray(target, jnp.float32)
    return start + (target - start) * jnp.minimum(jnp.asarray(step, jnp.float32) / warmup_steps, 1.0)


def type_params(cfg: ModelConfig) -> dict[str, float]:
    """Prunable params owned by each unit type: query heads with their KV heads, and MLP neurons."""
    counts = ParamCounts.of(cfg)
    neuron = float(cfg.num_layers * cfg.d_ff * counts.neuron)
    return {"head": float(counts.prunable) - neuron, "neuron": neuron}


def removal_budget(cfg: ModelConfig, target: jax.Array | float, over: str = "prunable") -> jax.Array:
    """Prunable params to remove so that the sparsity over `over` params is `target`."""
    counts = ParamCounts.of(cfg)
    denominator = float(counts.prunable if over == "prunable" else counts.total)
    return jnp.asarray(target, jnp.float32) * denominator


def deterministic_masks(cfg: ModelConfig, log_alphas: dict[str, jax.Array], target: jax.Array | float,
                        over: str = "prunable") -> dict[str, jax.Array]:
    """0/1 masks at `target`: each unit type gives up the target share of its params, lowest keep probability first.

    The rule the projection controller trains under (`koff/controller.py`): heads
    and neurons are ranked separately by keep probability (times their block's).
    Heads go lowest first, the last head of a KV group taking its KV head along,
    until the removed head params are nearest to the head type's share of the
    removal budget; neurons then fill the budget, so the realised sparsity is within
    half a neuron's cost of `target` (unless the heads alone overshoot it). A head
    of Gemma-3-270M costs ~170 neurons, so ranking both on one scale would let a
    mid-way head and a mid-way neuron trade at a wrong rate. A block's mask is 1
    while any of its units is kept. Jittable.
    """
    counts = ParamCounts.of(cfg)
    keep = keep_probs(log_alphas)
    L, F = cfg.num_layers, cfg.d_ff
    head_score = keep["head"] * keep["attn"][:, None] if "attn" in keep else keep["head"]
    neuron_score = keep["neuron"] * keep["mlp"][:, None] if "mlp" in keep else keep["neuron"]
    budget = removal_budget(cfg, target, over)

    head_rank = _ranks(head_score.reshape(-1))
    grouped = head_rank.reshape(L, cfg.num_kv_heads, cfg.group_size)
    closes_group = (grouped == jnp.max(grouped, axis=-1, keepdims=True)).reshape(-1)
    head_cost = float(counts.head) + float(counts.kv_head) * closes_group.astype(jnp.float32)
    removed = jnp.concatenate([jnp.zeros((1,)), jnp.cumsum(head_cost[jnp.argsort(head_rank)])])
    head_share = type_params(cfg)["head"] / float(counts.prunable)
    heads_removed = jnp.argmin(jnp.abs(removed - budget * head_share))
    neurons_removed = jnp.clip(jnp.round((budget - removed[heads_removed]) / float(counts.neuron)), 0, L * F)
    masks = {"head": (head_rank >= heads_removed).astype(jnp.float32).reshape(head_score.shape),
             "neuron": (_ranks(neuron_score.reshape(-1)) >= neurons_removed).astype(jnp.float32).reshape(L, F)}
    if "attn" in log_alphas:
        masks["attn"] = jnp.max(masks["head"], axis=-1)
    if "mlp" in log_alphas:
        masks["mlp"] = jnp.max(masks["neuron"], axis=-1)
    return masks


def _ranks(scores: jax.Array) -> jax.Array:
    """Each score's position in ascending order (ties by index)."""
    order = jnp.argsort(scores, stable=True)
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))


class Multiplier(nnx.Param):
    """A Lagrange multiplier; trained by gradient *ascent* at the multiplier learning rate."""


class Lagrangian(nnx.Module):
    """`N * (lambda1 * (s - t) + lambda2 * (s - t)**2)`, minimised by the gates, maximised by the lambdas.

    `N` is the number of gated units, so the multipliers are *per unit*: one unit
    moves `s` by about `1/N`, and without `N` the multipliers (and `lambda_lr`) would
    have to grow with model size before the constraint could outweigh a unit's LM
    gradient (Gemma-3-270M: a neuron's d s/d log_alpha is ~2e-7 against a typical LM
    gradient of ~1e-4). The multipliers ascend the unscaled gap (`multiplier_ascent_grads`).
    """

    def __init__(self):
        self.lambda1 = Multiplier(jnp.zeros(()), logical_axes=())
        self.lambda2 = Multiplier(jnp.zeros(()), logical_axes=())


def num_units(log_alphas: dict[str, jax.Array]) -> int:
    """How many gates there are (heads, neurons and any block gates)."""
    return sum(x.size for x in jax.tree.leaves(log_alphas))


def lagrangian(lambdas: dict[str, jax.Array], s_hat: jax.Array, target: jax.Array, units: int = 1) -> jax.Array:
    """The penalty the gates minimise: `units * (lambda1 * gap + lambda2 * gap**2)`, `gap = s_hat - target`."""
    gap = s_hat - target
    return units * (lambdas["lambda1"] * gap + lambdas["lambda2"] * gap**2)


def multiplier_ascent_grads(s_hat: jax.Array, target: jax.Array) -> dict[str, jax.Array]:
    """d/d(lambda) of the per-unit Lagrangian (`units=1`): the multipliers climb at `lambda_lr * gap`."""
    gap = s_hat - target
    return {"lambda1": gap, "lambda2": gap**2}
