"""Hard-concrete gates: Monte-Carlo against the closed forms."""

import jax
import jax.numpy as jnp
import numpy as np

from sparsemem.koff import gates


def test_gate_distribution_matches_closed_form():
    log_alpha = jax.random.uniform(jax.random.key(0), (12,), minval=-4.0, maxval=4.0)
    n = 200_000
    z = jax.vmap(lambda k: gates.sample(log_alpha, k))(jax.random.split(jax.random.key(1), n))
    z = np.asarray(z)
    assert z.min() == 0.0 and z.max() == 1.0
    # Binomial/mean standard errors at n=2e5 are <= 1.2e-3; 5e-3 is > 4 sigma.
    np.testing.assert_allclose((z == 0).mean(0), 1 - gates.keep_prob(log_alpha), atol=5e-3)
    np.testing.assert_allclose((z == 1).mean(0), gates.prob_one(log_alpha), atol=5e-3)
    np.testing.assert_allclose(z.mean(0), gates.expected_value(log_alpha), atol=5e-3)


def test_expected_value_extremes_and_init():
    np.testing.assert_allclose(gates.expected_value(jnp.array([-30.0, 30.0])), [0.0, 1.0], atol=1e-6)
    la = gates.log_alpha_for(0.99)
    np.testing.assert_allclose(gates.keep_prob(jnp.float32(la)), 0.99, rtol=1e-6)


def test_samples_are_differentiable():
    grad = jax.grad(lambda la: gates.sample(la, jax.random.key(0)).sum())(jnp.zeros((64,)))
    assert np.all(np.isfinite(grad)) and np.any(grad > 0)
