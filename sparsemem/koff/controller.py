"""The sparsity controller: keeps the gates' expected sparsity on its schedule.

Adam normalises each gate's step, so a Lagrangian's multipliers set only the sign
of a gate's move, not its size; the expected sparsity then lags and overshoots
(docs/experiments.md, "Gate dynamics"). The default controller, `project`, keeps
the constraint out of the optimiser: after each gate step on the language-model
gradient alone, every `log_alpha` of a unit type (query heads with their KV heads
and attention blocks; MLP neurons with MLP blocks) is shifted by one scalar, found
by bisection, so that the type's expected removed fraction of parameters equals
the scheduled target, and clamped to `[-clamp, clamp]`. The optimiser decides which
units go (the order of `log_alpha` within a type), the projection how many. The
gates' optimiser (`array_adam`) normalises by one second moment per gate array, not
per unit: a unit moves in proportion to its own evidence, so a unit the LM does not
need (zero gradient) sinks with the shift below the units it needs, instead of
keeping pace with them as under per-unit Adam, which steps every unit at full speed
whatever the size of its gradient. In the
last steps `polarising_factor` spreads the gates to the clamp ends, so the sampled
gates become the deterministic mask.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparsemem.koff import sparsity
from sparsemem.koff.config import KoffConfig
from sparsemem.koff import gates as gates_lib
from sparsemem.models.config import ModelConfig

# Gate arrays of each unit type: a block gate scales every unit of its block.
UNIT_TYPES = {"head": ("head", "attn"), "neuron": ("neuron", "mlp")}
BISECTION_STEPS = 40  # halves a bracket of width 4 * clamp to ~1e-11: float32-exact


def _only(log_alphas: dict[str, jax.Array], unit_type: str) -> dict[str, jax.Array]:
    """Keep probabilities with every unit of the other type removed (its params drop out of `remaining`)."""
    keep = sparsity.keep_probs(log_alphas)
    other = "neuron" if unit_type == "head" else "head"
    return {**keep, other: jnp.zeros_like(keep[other])}


def removed_fraction(cfg: ModelConfig, log_alphas: dict[str, jax.Array], unit_type: str) -> jax.Array:
    """Expected fraction of `unit_type`'s params removed under independent gates."""
    return 1.0 - sparsity.remaining_params(cfg, _only(log_alphas, unit_type)) / sparsity.type_params(cfg)[unit_type]


def initial_sparsity(cfg: ModelConfig, kcfg: KoffConfig) -> float:
    """The expected sparsity of the initial gates (before jitter): where the target ramp starts.

    A ramp from 0 would lie below it, and the controller would first push the gates the wrong way.
    """
    L = cfg.num_layers
    shapes = {"head": (L, cfg.num_heads), "neuron": (L, cfg.d_ff)}
    if kcfg.block_gates:
        shapes.update(attn=(L,), mlp=(L,))
    initial = gates_lib.log_alpha_for(kcfg.init_keep_prob)
    return float(sparsity.expected_sparsity(cfg, {k: jnp.full(s, initial) for k, s in shapes.items()},
                                            kcfg.sparsity_over))


class ArrayAdamState(NamedTuple):
    count: jax.Array
    mu: dict[str, jax.Array]  # per unit
    nu: dict[str, jax.Array]  # one scalar per gate array


def array_adam(learning_rate: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
               ) -> optax.GradientTransformation:
    """Adam whose second moment is the mean square over each whole array: scale-free across model
    sizes like Adam, but the units of an array keep the ratios of their gradients."""

    def init(params):
        return ArrayAdamState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params),
                              jax.tree.map(lambda p: jnp.zeros((), p.dtype), params))

    def update(grads, state, params=None):
        del params
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.mean(jnp.square(g)), state.nu, grads)
        c1, c2 = 1 - b1 ** count.astype(jnp.float32), 1 - b2 ** count.astype(jnp.float32)
        updates = jax.tree.map(lambda m, v: -learning_rate * (m / c1) / (jnp.sqrt(v / c2) + eps), mu, nu)
        return updates, ArrayAdamState(count, mu, nu)

    return optax.GradientTransformation(init, update)


def project(cfg: ModelConfig, log_alphas: dict[str, jax.Array], target: jax.Array | float, over: str,
            clamp: float) -> dict[str, jax.Array]:
    """`log_alphas` shifted per unit type (one scalar each, by bisection) and clamped to `[-clamp, clamp]`,
    so that each type's expected removed fraction, and hence the expected sparsity, equals `target`.

    The removed fraction falls monotonically in the shift, so bisection over
    `[-2 clamp, 2 clamp]` (every unit at either clamp end) converges. A target past
    what the clamp allows ends at that end. Jittable.
    """
    fraction = sparsity.removal_budget(cfg, target, over) / float(sparsity.ParamCounts.of(cfg).prunable)
    out = dict(log_alphas)
    for unit_type, names in UNIT_TYPES.items():
        names = [n for n in names if n in log_alphas]

        def shifted(c, names=names):
            return {**out, **{n: jnp.clip(log_alphas[n] + c, -clamp, clamp) for n in names}}

        def halve(_, bracket, unit_type=unit_type, shifted=shifted):
            lo, hi = bracket
            mid = (lo + hi) / 2
            too_sparse = removed_fraction(cfg, shifted(mid), unit_type) > fraction
            return jnp.where(too_sparse, mid, lo), jnp.where(too_sparse, hi, mid)

        lo, hi = jax.lax.fori_loop(0, BISECTION_STEPS, halve, (jnp.float32(-2 * clamp), jnp.float32(2 * clamp)))
        out = shifted((lo + hi) / 2)
    return out


def polarising_factor(step: jax.Array, gate_steps: int, polarise_steps: int, growth: float) -> jax.Array:
    """The factor on every `log_alpha` at `step`: 1, then `growth ** (1 / polarise_steps)` in the last steps.

    Scaling all `log_alpha` spreads them apart in the order they have; the projection
    that follows removes the shift part, so the scaling's centre does not matter.
    """
    if polarise_steps <= 0:
        return jnp.float32(1.0)
    return jnp.where(step >= gate_steps - polarise_steps, jnp.float32(growth ** (1.0 / polarise_steps)), 1.0)


def projected_update(cfg: ModelConfig, kcfg: KoffConfig, tx: optax.GradientTransformation,
                     log_alphas: dict[str, jax.Array], opt_state: optax.OptState, lm_grads: dict[str, jax.Array],
                     step: jax.Array, target: jax.Array) -> tuple[dict[str, jax.Array], optax.OptState]:
    """One gate step: `tx` on the LM gradient, the polarising spread, then the projection onto `target`."""
    updates, opt_state = tx.update(lm_grads, opt_state, log_alphas)
    spread = polarising_factor(step, kcfg.gate_steps, kcfg.polarise_steps, kcfg.polarise_growth)
    stepped = jax.tree.map(lambda la: la * spread, optax.apply_updates(log_alphas, updates))
    return project(cfg, stepped, target, kcfg.sparsity_over, kcfg.log_alpha_clamp), opt_state


def polarised_fraction(log_alphas: dict[str, jax.Array], threshold: float = 0.1) -> jax.Array:
    """Fraction of gated units that are nearly decided: P(z > 0) < threshold or P(z = 1) > 1 - threshold."""
    decided = [jnp.sum((gates_lib.keep_prob(la) < threshold) | (gates_lib.prob_one(la) > 1.0 - threshold))
               for la in jax.tree.leaves(log_alphas)]
    return sum(decided) / sparsity.num_units(log_alphas)
