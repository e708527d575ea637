"""Decoder behaviour: KV-cache decoding, hook semantics, chunked losses, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsemem.models.config import preset
from sparsemem.models.decoder import Decoder
from sparsemem.models.hooks import Hooks, LoRADelta, projection_shape
from sparsemem.models.loss import token_cross_entropy, token_kl
from sparsemem.parallel.mesh import make_mesh, state_shardings

TINY_GEMMA = preset("gemma-3-270m").replace(
    num_layers=3, d_model=64, d_ff=96, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=160, sliding_window=5)
TINY_LLAMA = preset("llama-3.2-1b").replace(
    num_layers=2, d_model=64, d_ff=96, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=160)


def random_model(cfg, seed=0):
    model = Decoder(cfg, rngs=nnx.Rngs(seed))
    # Non-trivial norms so the `1+w` / `w` conventions matter.
    for name in ("attn_norm", "mlp_norm"):
        var = getattr(model.layers, name)
        var[...] = var[...] + 0.3 * jax.random.normal(jax.random.key(seed + 1), var.shape)
    return model


@nnx.jit
def forward(model, x, kwargs):
    """Jitted `model(x, **kwargs)`; eager scans would re-trace on every call."""
    return model(x, **kwargs)


def tokens(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(1, 160, shape), jnp.int32)


@pytest.mark.parametrize("cfg", [TINY_GEMMA, TINY_LLAMA], ids=["gemma3", "llama"])
def test_cache_decode_equals_full_forward(cfg):
    """Prefill a left-padded prompt, then decode token by token: same hidden states as one full pass."""
    model = random_model(cfg)
    seq = tokens((2, 14))
    segments = jnp.ones((2, 14), jnp.int32).at[0, :3].set(0)
    full, _ = forward(model, seq, dict(segment_ids=segments))

    prompt = 6
    cache = model.init_cache(batch=2, max_len=16)
    hidden, cache = forward(model, seq[:, :prompt], dict(segment_ids=segments[:, :prompt], cache=cache))
    steps = [hidden]
    for t in range(prompt, 14):
        hidden, cache = forward(model, seq[:, t:t + 1], dict(cache=cache))
        steps.append(hidden)
    decoded = jnp.concatenate(steps, axis=1)
    valid = np.asarray(segments, bool)
    np.testing.assert_allclose(np.asarray(decoded)[valid], np.asarray(full)[valid], atol=2e-5, rtol=2e-5)
    assert int(cache.index) == 14
    np.testing.assert_array_equal(cache.next_position, [11, 14])


def test_neutral_hooks_change_nothing():
    cfg = TINY_GEMMA
    model = random_model(cfg)
    x = tokens((2, 9))
    b, L, r = 2, cfg.num_layers, 3
    lora = {}
    for name in ("q", "k", "v", "o", "gate", "up", "down"):
        fan_in, fan_out = projection_shape(cfg, name)
        lora[name] = LoRADelta(a=jax.random.normal(jax.random.key(1), (b, L, fan_in, r)),
                               b=jnp.zeros((b, L, r, fan_out)), scale=2.0)
    hooks = Hooks(head_scale=jnp.ones((L, cfg.num_heads)), neuron_scale=jnp.ones((L, cfg.d_ff)), lora=lora)
    np.testing.assert_array_equal(forward(model, x, dict(hooks=hooks))[0], forward(model, x, {})[0])


def test_zero_scales_equal_removed_weights():
    """Scaling a head / neuron by zero equals deleting its o_proj rows / down_proj rows."""
    cfg = TINY_GEMMA
    model = random_model(cfg)
    x = tokens((2, 9))
    head_scale = jnp.ones((cfg.num_layers, cfg.num_heads)).at[0, 1].set(0).at[2, 3].set(0)
    neuron_scale = jnp.ones((cfg.num_layers, cfg.d_ff)).at[1, :40].set(0)
    hooked, _ = forward(model, x, dict(hooks=Hooks(head_scale=head_scale, neuron_scale=neuron_scale)))

    wo, w_down = model.layers.wo, model.layers.w_down
    wo[...] = wo[...] * head_scale[:, :, None, None]
    w_down[...] = w_down[...] * neuron_scale[:, :, None]
    removed, _ = forward(model, x, {})
    np.testing.assert_allclose(hooked, removed, atol=1e-6)


def test_lora_equals_merged_weights_per_example():
    """Row i's LoRA delta acts like W + scale * A_i B_i for that row only."""
    cfg = TINY_LLAMA
    model = random_model(cfg)
    x = tokens((2, 7))
    fan_in, fan_out = projection_shape(cfg, "up")
    keys = jax.random.split(jax.random.key(3), 2)
    a = 0.1 * jax.random.normal(keys[0], (2, cfg.num_layers, fan_in, 4))
    b = 0.1 * jax.random.normal(keys[1], (2, cfg.num_layers, 4, fan_out))
    hooked, _ = forward(model, x, dict(hooks=Hooks(lora={"up": LoRADelta(a=a, b=b, scale=0.5)})))
    base = model.layers.w_up[...]
    for row in range(2):
        model.layers.w_up[...] = base + 0.5 * jnp.einsum("lir,lro->lio", a[row], b[row])
        merged, _ = forward(model, x[row:row + 1], {})
        np.testing.assert_allclose(hooked[row:row + 1], merged, atol=1e-5)
    model.layers.w_up[...] = base


@pytest.mark.parametrize("cfg", [TINY_GEMMA, TINY_LLAMA], ids=["gemma3", "llama"])
def test_memory_slots_equal_a_cached_prefix(cfg):
    """Memory k/v taken from a prefix's cache act exactly like that prefix.

    With Gemma-3's window of 5 the text runs to position 11, so every memory slot leaves
    the local layers' window on the way, as the prefix token it stands for would.
    """
    model = random_model(cfg)
    seq, m = tokens((2, 12)), 3
    full, _ = forward(model, seq, {})
    cache = model.init_cache(batch=2, max_len=m)
    _, cache = forward(model, seq[:, :m], dict(cache=cache))
    hooks = Hooks(memory_k=jnp.moveaxis(cache.k, 0, 1), memory_v=jnp.moveaxis(cache.v, 0, 1))
    positions = jnp.broadcast_to(jnp.arange(m, 12), (2, 12 - m))
    rest, _ = forward(model, seq[:, m:], dict(positions=positions, hooks=hooks))
    np.testing.assert_allclose(rest, full[:, m:], atol=2e-5, rtol=2e-5)


def direct_cross_entropy(logits, targets):
    """Per-token cross-entropy from materialised full logits (the reference for the chunked loss)."""
    return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]


def test_chunked_losses_match_direct():
    cfg = TINY_GEMMA
    model = random_model(cfg)
    x = tokens((3, 10))
    hidden, _ = forward(model, x, {})
    targets = jnp.roll(x, -1, axis=1)
    logits = model.logits(hidden)
    np.testing.assert_allclose(token_cross_entropy(model, hidden, targets, chunk_size=7),
                               direct_cross_entropy(logits, targets), atol=1e-5)

    other, _ = forward(model, x, dict(hooks=Hooks(head_scale=jnp.full((cfg.num_layers, cfg.num_heads), 0.5))))
    p, q = jax.nn.log_softmax(logits), jax.nn.log_softmax(model.logits(other))
    direct_kl = jnp.sum(jnp.exp(p) * (p - q), -1)
    np.testing.assert_allclose(token_kl(model, hidden, other, chunk_size=8), direct_kl, atol=1e-5)
    np.testing.assert_allclose(token_kl(model, hidden, hidden, chunk_size=8), 0.0, atol=1e-6)


def test_chunked_loss_gradient_matches_direct():
    cfg = TINY_LLAMA
    model = random_model(cfg)
    x = tokens((2, 6))
    hidden, _ = forward(model, x, {})
    targets = jnp.roll(x, -1, axis=1)

    def direct(h):
        return jnp.sum(direct_cross_entropy(model.logits(h), targets))

    chunked = jax.grad(lambda h: jnp.sum(token_cross_entropy(model, h, targets, chunk_size=5)))(hidden)
    np.testing.assert_allclose(chunked, jax.grad(direct)(hidden), atol=1e-5)


def test_sharded_forward_equals_single_device():
    cfg = TINY_GEMMA
    model = random_model(cfg)
    x = tokens((4, 12))
    segments = jnp.asarray(np.repeat([[1] * 5 + [2] * 7], 4, axis=0), jnp.int32)
    expected, _ = forward(model, x, dict(segment_ids=segments))

    mesh = make_mesh({"data": 2, "model": 4})
    graphdef, state = nnx.split(model)
    sharded_state = jax.device_put(state, state_shardings(state, mesh))
    assert sharded_state["layers"]["wq"][...].sharding.spec[2] == "model"

    @jax.jit
    def sharded_forward(state, x, segments):
        return nnx.merge(graphdef, state)(x, segment_ids=segments)[0]

    with jax.set_mesh(mesh):
        got = sharded_forward(sharded_state, x, segments)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_bfloat16_compute_tracks_float32():
    """bf16 compute (f32 params) stays close to f32: a numerics sanity bound, not parity."""
    cfg = TINY_GEMMA
    model = random_model(cfg)
    x = tokens((2, 12))
    hidden32, _ = forward(model, x, {})
    graphdef, state = nnx.split(model)
    model16 = nnx.merge(graphdef, state)
    model16.dtype = jnp.bfloat16
    hidden16, _ = forward(model16, x, {})
    assert hidden16.dtype == jnp.bfloat16
    logits32, logits16 = model.logits(hidden32), model16.logits(hidden16)
    assert float(jnp.abs(logits16 - logits32).max() / jnp.abs(logits32).max()) < 5e-2
