"""Hard-concrete (L0) gates on query heads and MLP neurons (Louizos et al. 2018).

Each prunable unit has a `log_alpha`. Training samples a stretched, clipped
concrete variable `z in [0, 1]` (exactly 0 or 1 with positive probability) so the
gates get gradients; evaluation uses a deterministic top-k mask from
`sparsemem.koff.sparsity.deterministic_masks`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsemem.models.config import ModelConfig

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
EPS = 1e-6
# log(-gamma / zeta): the shift between log_alpha and the logit of P(z > 0).
_SHIFT = BETA * math.log(-GAMMA / ZETA)


class GateLogit(nnx.Param):
    """A gate's `log_alpha`; trained at the gate learning rate."""


def sample(log_alpha: jax.Array, key: jax.Array) -> jax.Array:
    """One training sample of the gates `z`, differentiable in `log_alpha`."""
    u = jax.random.uniform(key, log_alpha.shape, jnp.float32, EPS, 1.0 - EPS)
    s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / BETA)
    return jnp.clip(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def keep_prob(log_alpha: jax.Array) -> jax.Array:
    """P(z > 0): the probability that the unit is kept (its expected L0 norm)."""
    return jax.nn.sigmoid(log_alpha - _SHIFT)


def prob_one(log_alpha: jax.Array) -> jax.Array:
    """P(z = 1): the probability that the unit passes unscaled."""
    return jax.nn.sigmoid(log_alpha - BETA * math.log((1.0 - GAMMA) / (ZETA - 1.0)))


_GL_X, _GL_W = np.polynomial.legendre.leggauss(48)


def expected_value(log_alpha: jax.Array) -> jax.Array:
    """E[z] = integral over x in (0, 1) of P(z > x), by 48-point Gauss-Legendre quadrature.

    P(z > x) = sigmoid(log_alpha - beta * logit((x - gamma) / (zeta - gamma))) is smooth
    on [0, 1], so the quadrature is exact to float precision.
    """
    x = jnp.asarray((_GL_X + 1.0) / 2.0, jnp.float32)
    w = jnp.asarray(_GL_W / 2.0, jnp.float32)
    q = (x - GAMMA) / (ZETA - GAMMA)
    tail = jax.nn.sigmoid(log_alpha[..., None] - BETA * (jnp.log(q) - jnp.log1p(-q)))
    return jnp.sum(tail * w, axis=-1)


def log_alpha_for(keep: float) -> float:
    """The `log_alpha` whose keep probability P(z > 0) is `keep`."""
    return math.log(keep) - math.log1p(-keep) + _SHIFT


class Gates(nnx.Module):
    """`log_alpha` for query heads `[L, H]`, MLP neurons `[L, F]` and optionally whole blocks `[L]`."""

    def __init__(self, cfg: ModelConfig, *, block_gates: bool = False, init_keep_prob: float = 0.99,
                 init_jitter: float = 0.0, key: jax.Array | None = None):
        """All units start at `log_alpha_for(init_keep_prob)` plus N(0, `init_jitter`) noise drawn from `key`."""
        init = log_alpha_for(init_keep_prob)
        L = cfg.num_layers
        keys = iter(jax.random.split(key if key is not None else jax.random.key(0), 4))

        def logit(shape, axes):
            noise = init_jitter * jax.random.normal(next(keys), shape, jnp.float32)
            return GateLogit(init + noise, logical_axes=axes)

        self.head = logit((L, cfg.num_heads), ("layers", None))
        self.neuron = logit((L, cfg.d_ff), ("layers", None))
        if block_gates:
            self.attn = logit((L,), ("layers",))
            self.mlp = logit((L,), ("layers",))


def scales(z: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Per-unit multipliers `(head_scale [L, H], neuron_scale [L, F])` from gate values or masks.

    `z` maps gate names (`head`, `neuron`, optional `attn`, `mlp`) to values, with any leading
    axes (stacked samples); block gates multiply every unit of their block.
    """
    head, neuron = z["head"], z["neuron"]
    if "attn" in z:
        head = head * z["attn"][..., None]
    if "mlp" in z:
        neuron = neuron * z["mlp"][..., None]
    return head, neuron


def sample_all(log_alphas: dict[str, jax.Array], key: jax.Array) -> dict[str, jax.Array]:
    """Independent samples for every gate array, one key each."""
    keys = jax.random.split(key, len(log_alphas))
    return {name: sample(la, k) for (name, la), k in zip(sorted(log_alphas.items()), keys)}
