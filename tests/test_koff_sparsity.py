"""Parameter accounting (GQA), deterministic masks, compaction and the Lagrangian."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsemem.koff import controller, sparsity
from sparsemem.koff.weight_slicing import compact, prunable_size
from sparsemem.models.config import preset
from sparsemem.models.decoder import Decoder

TINY = dict(num_layers=2, d_model=64, d_ff=128, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=256)


def tiny(name):
    extra = {"sliding_window": 8} if name.startswith("gemma") else {}
    return preset(name).replace(**TINY, **extra)


@pytest.mark.parametrize("name", ["gemma-3-270m", "qwen2.5-3b", "qwen3-0.6b", "llama-3.1-8b"])
def test_param_counts_match_decoder(name):
    cfg = tiny(name)
    decoder = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    total = sum(x.size for x in jax.tree.leaves(nnx.state(decoder, nnx.Param)))
    assert sparsity.ParamCounts.of(cfg).total == total


def random_log_alphas(cfg, key, blocks=False):
    k1, k2, k3 = jax.random.split(key, 3)
    out = {"head": jax.random.normal(k1, (cfg.num_layers, cfg.num_heads)) * 3,
           "neuron": jax.random.normal(k2, (cfg.num_layers, cfg.d_ff)) * 3}
    if blocks:
        out["attn"] = jax.random.normal(k3, (cfg.num_layers,)) + 3
        out["mlp"] = -jax.random.normal(k3, (cfg.num_layers,)) + 3
    return out


@pytest.mark.parametrize("name,blocks", [("qwen2.5-3b", False), ("gemma-3-270m", True)])
@pytest.mark.parametrize("target", [0.1, 0.45, 0.8])
def test_deterministic_mask_hits_target_and_compaction_counts_agree(name, blocks, target):
    cfg = tiny(name)  # GQA: 4 query heads over 2 KV heads; qwen2 also has q/k/v biases
    counts = sparsity.ParamCounts.of(cfg)
    log_alphas = random_log_alphas(cfg, jax.random.key(int(target * 100)), blocks)
    masks = sparsity.deterministic_masks(cfg, log_alphas, target)
    remaining = sparsity.remaining_params(cfg, masks)
    realised = float(sparsity.sparsity(cfg, remaining))
    # Neurons fill what the heads leave: within half a neuron's cost of the target.
    assert abs(realised - target) <= counts.neuron / 2 / counts.prunable + 1e-6
    # Heads give up the target share of the head params, to within half a head closing its KV group.
    head_only = {"head": masks["head"], "neuron": jnp.zeros_like(masks["neuron"])}
    if blocks:
        head_only["attn"] = masks["attn"]
    head_removed = sparsity.type_params(cfg)["head"] - float(sparsity.remaining_params(cfg, head_only))
    assert abs(head_removed / sparsity.type_params(cfg)["head"] - target) <= (
        (counts.head + counts.kv_head) / 2 / sparsity.type_params(cfg)["head"] + 1e-6)
    # Within each type, kept units outscore removed ones.
    keep = sparsity.keep_probs(log_alphas)
    scores = {"head": keep["head"] * keep["attn"][:, None] if blocks else keep["head"],
              "neuron": keep["neuron"] * keep["mlp"][:, None] if blocks else keep["neuron"]}
    for unit, score in scores.items():
        kept, removed = score[masks[unit] > 0], score[masks[unit] == 0]
        if kept.size and removed.size:
            assert kept.min() >= removed.max()

    decoder = Decoder(cfg, rngs=nnx.Rngs(0))
    layers = compact(cfg, decoder.layers.weights(), masks)
    assert prunable_size(layers) == int(remaining)
    for layer, head_mask in zip(layers, np.asarray(masks["head"])):
        kept_heads = np.flatnonzero(head_mask)
        assert layer["wq"].shape[1] == layer["wo"].shape[0] == kept_heads.size
        assert layer["wk"].shape[1] == len(set(kept_heads // cfg.group_size))


def test_kv_head_goes_only_with_its_whole_group():
    cfg = tiny("llama-3.1-8b")
    counts = sparsity.ParamCounts.of(cfg)
    neuron = jnp.ones((2, cfg.d_ff))
    one_head_per_group = jnp.array([[0, 1, 0, 1], [1, 1, 1, 1]], jnp.float32)
    whole_group = jnp.array([[0, 0, 1, 1], [1, 1, 1, 1]], jnp.float32)
    full = sparsity.remaining_params(cfg, {"head": jnp.ones((2, 4)), "neuron": neuron})
    assert full == counts.prunable
    assert full - sparsity.remaining_params(cfg, {"head": one_head_per_group, "neuron": neuron}) == 2 * counts.head
    assert (full - sparsity.remaining_params(cfg, {"head": whole_group, "neuron": neuron})
            == 2 * counts.head + counts.kv_head)


def test_sparsity_over_all_is_smaller_and_target_warms_up():
    cfg = tiny("gemma-3-270m")
    la = random_log_alphas(cfg, jax.random.key(0))
    assert sparsity.expected_sparsity(cfg, la, "all") < sparsity.expected_sparsity(cfg, la, "prunable")
    np.testing.assert_allclose([sparsity.target_at(s, 0.4, 10) for s in (0, 5, 10, 20)], [0, 0.2, 0.4, 0.4])
    # From the initial expected sparsity, not from 0.
    np.testing.assert_allclose([sparsity.target_at(s, 0.4, 10, 0.1) for s in (0, 5, 10, 20)], [0.1, 0.25, 0.4, 0.4],
                               rtol=1e-6)


def test_lagrangian_gradients_push_towards_target():
    lambdas = {"lambda1": jnp.float32(0.0), "lambda2": jnp.float32(0.0)}
    g = jax.grad(sparsity.lagrangian)(lambdas, jnp.float32(0.1), jnp.float32(0.3))
    # Ascent on lambda1 (lambda1 += lr * (s - t)) makes it negative, which then rewards sparsity.
    assert g["lambda1"] < 0 and g["lambda2"] > 0
    lambdas = {"lambda1": jnp.float32(-1.0), "lambda2": jnp.float32(0.0)}
    ds = jax.grad(sparsity.lagrangian, argnums=1)(lambdas, jnp.float32(0.1), jnp.float32(0.3))
    assert ds < 0  # minimising over gates now increases sparsity


def test_multipliers_ascend_the_per_unit_lagrangian_and_gates_feel_it_per_unit():
    lambdas = {"lambda1": jnp.float32(-0.5), "lambda2": jnp.float32(0.2)}
    s, t = jnp.float32(0.1), jnp.float32(0.3)
    ascent = sparsity.multiplier_ascent_grads(s, t)
    per_unit = jax.grad(sparsity.lagrangian)(lambdas, s, t)
    jax.tree.map(np.testing.assert_allclose, ascent, per_unit)
    scaled = jax.grad(sparsity.lagrangian, argnums=1)(lambdas, s, t, 1000)
    np.testing.assert_allclose(scaled, 1000 * jax.grad(sparsity.lagrangian, argnums=1)(lambdas, s, t), rtol=1e-6)
    cfg = tiny("gemma-3-270m")
    assert sparsity.num_units(random_log_alphas(cfg, jax.random.key(0))) == cfg.num_layers * (cfg.num_heads + cfg.d_ff)


def exact_remaining(cfg, masks) -> int:
    """Prunable params left under 0/1 `head`/`neuron` masks, counted in Python ints."""
    counts = sparsity.ParamCounts.of(cfg)
    head, neuron = np.asarray(masks["head"], bool), np.asarray(masks["neuron"], bool)
    kv = head.reshape(cfg.num_layers, cfg.num_kv_heads, cfg.group_size).any(-1)
    return int(head.sum()) * counts.head + int(kv.sum()) * counts.kv_head + int(neuron.sum()) * counts.neuron


@pytest.mark.parametrize("name", ["llama-3.1-8b", "qwen2.5-7b"])
@pytest.mark.parametrize("over", ["prunable", "all"])
def test_accounting_past_int32_at_full_size(name, over):
    """7-8B models have more than 2**31 prunable params: masks, sparsity and the projection trace and hit the target."""
    cfg = preset(name)
    counts = sparsity.ParamCounts.of(cfg)
    assert counts.prunable > 2**31
    log_alphas = random_log_alphas(cfg, jax.random.key(0))
    target = 0.12
    masks = jax.jit(sparsity.deterministic_masks, static_argnums=(0, 3))(cfg, log_alphas, target, over)
    denominator = counts.prunable if over == "prunable" else counts.total
    realised = (counts.prunable - exact_remaining(cfg, masks)) / denominator
    assert abs(realised - target) <= counts.neuron / 2 / denominator * 1.01  # float32 cumsums: within 1% of it
    traced = jax.jit(lambda m: sparsity.sparsity(cfg, sparsity.remaining_params(cfg, m), over))(masks)
    assert float(traced) == pytest.approx(realised, abs=1e-6)
    projected = jax.jit(controller.project, static_argnums=(0, 3, 4))(cfg, log_alphas, target, over, 6.0)
    assert float(sparsity.expected_sparsity(cfg, projected, over)) == pytest.approx(target, abs=1e-4)
