"""The projection controller: exact expected sparsity per unit type, on schedule under any LM gradient, polarised."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsemem.koff import controller, sparsity
from sparsemem.koff.config import KoffConfig
from sparsemem.models.config import preset

TINY = dict(num_layers=2, d_model=64, d_ff=128, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=256)


def random_log_alphas(cfg, key, blocks=False):
    keys = jax.random.split(key, 4)
    out = {"head": 3 * jax.random.normal(keys[0], (cfg.num_layers, cfg.num_heads)),
           "neuron": 3 * jax.random.normal(keys[1], (cfg.num_layers, cfg.d_ff))}
    if blocks:
        out["attn"] = jax.random.normal(keys[2], (cfg.num_layers,)) + 3
        out["mlp"] = jax.random.normal(keys[3], (cfg.num_layers,)) + 3
    return out


@pytest.mark.parametrize("cfg,blocks", [(preset("qwen2.5-3b").replace(**TINY), False),
                                        (preset("gemma-3-270m").replace(**TINY, sliding_window=8), True),
                                        (preset("gemma-3-270m"), False)])
@pytest.mark.parametrize("target,over", [(0.05, "prunable"), (0.3, "prunable"), (0.25, "all")])
def test_projection_puts_each_unit_type_on_target_and_keeps_the_order(cfg, blocks, target, over):
    log_alphas = random_log_alphas(cfg, jax.random.key(int(100 * target)), blocks)
    projected = jax.jit(controller.project, static_argnums=(0, 3, 4))(cfg, log_alphas, target, over, 5.0)
    np.testing.assert_allclose(sparsity.expected_sparsity(cfg, projected, over), target, atol=1e-4)
    fraction = sparsity.removal_budget(cfg, target, over) / sparsity.ParamCounts.of(cfg).prunable
    for unit in ("head", "neuron"):
        np.testing.assert_allclose(controller.removed_fraction(cfg, projected, unit), fraction, atol=1e-4)
    for name, la in projected.items():
        assert np.abs(la).max() <= 5.0
        before, after = np.asarray(log_alphas[name]).ravel(), np.asarray(la).ravel()
        inside = np.abs(after) < 5.0  # one shift per type: units off the clamp keep their spacing
        np.testing.assert_allclose(np.diff(after[inside]), np.diff(before[inside]), atol=1e-4)


def synthetic_run(cfg, kcfg, lm_scale, seed=0):
    """Expected sparsity and target per step with gates driven by a fixed random LM gradient plus noise."""
    tx = controller.array_adam(kcfg.gate_lr)  # what the trainer steps the gates with under the projection
    init = jax.tree.map(lambda x: jnp.full_like(x, 2.99), random_log_alphas(cfg, jax.random.key(0)))
    fixed = jax.tree.map(lambda x: lm_scale * x, random_log_alphas(cfg, jax.random.key(seed + 1)))
    start = float(sparsity.expected_sparsity(cfg, init))

    def step(carry, i):
        la, opt = carry
        noise = random_log_alphas(cfg, jax.random.fold_in(jax.random.key(seed + 2), i))
        grads = jax.tree.map(lambda f, n: f + lm_scale * n, fixed, noise)
        target = sparsity.target_at(i, kcfg.target_sparsity, kcfg.warmup_steps, start)
        la, opt = controller.projected_update(cfg, kcfg, tx, la, opt, grads, i, target)
        return (la, opt), (sparsity.expected_sparsity(cfg, la), target, controller.polarised_fraction(la))

    _, out = jax.jit(lambda: jax.lax.scan(step, (init, tx.init(init)), jnp.arange(kcfg.total_steps)))()
    return jax.device_get(out)


@pytest.mark.parametrize("gate_lr", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("lm_scale", [1e-4, 1.0])
@pytest.mark.parametrize("polarise_fraction", [0.0, 0.2])
def test_expected_sparsity_follows_the_schedule_under_any_lm_gradient(gate_lr, lm_scale, polarise_fraction):
    cfg = preset("gemma-3-270m")
    kcfg = KoffConfig(num_domains=1, target_sparsity=0.12, total_steps=100, warmup_fraction=0.3, gate_lr=gate_lr,
                      polarise_fraction=polarise_fraction)
    s, target, polarised = synthetic_run(cfg, kcfg, lm_scale)
    after_ramp = slice(kcfg.warmup_steps, None)
    assert np.abs(s[after_ramp] - target[after_ramp]).max() <= 0.01
    assert s.max() <= 1.1 * kcfg.target_sparsity
    if polarise_fraction:
        assert polarised[-1] >= 0.9


def test_polarising_factor_spreads_only_the_last_steps():
    factor = functools.partial(controller.polarising_factor, gate_steps=10, polarise_steps=2, growth=100.0)
    np.testing.assert_allclose([factor(i) for i in range(10)], [1.0] * 8 + [10.0, 10.0], rtol=1e-6)
    assert controller.polarising_factor(9, 10, 0, 100.0) == 1.0


def test_polarised_fraction_counts_decided_units():
    la = {"head": jnp.array([[-5.0, 5.0, 0.0, 4.0]]), "neuron": jnp.array([[-4.0, 1.0]])}
    np.testing.assert_allclose(controller.polarised_fraction(la), 4 / 6)


def test_array_adam_keeps_gradient_ratios_within_an_array():
    tx = controller.array_adam(0.1)
    params = {"a": jnp.zeros(4), "b": jnp.zeros(2)}
    grads = {"a": jnp.array([0.0, 1.0, 2.0, -4.0]), "b": jnp.array([1e-6, -1e-6])}
    updates, _ = tx.update(grads, tx.init(params))
    rms = np.sqrt(np.mean(np.square(grads["a"])))
    np.testing.assert_allclose(updates["a"], -0.1 * grads["a"] / rms, rtol=1e-5)  # a zero gradient: no move
    np.testing.assert_allclose(updates["b"], [-0.1, 0.1], rtol=0.02)  # scale-free across arrays (eps aside), like Adam
