"""The chunked, fused-gradient losses equal the unchunked ones: values and gradients, CE and KL."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsemem.models.config import preset
from sparsemem.models.decoder import Decoder
from sparsemem.models.loss import num_vocab_blocks, token_cross_entropy, token_kl
from sparsemem.scale.flops import jaxpr_flops

CFG = preset("gemma-3-270m").replace(num_layers=1, d_model=32, d_ff=64, num_heads=2, num_kv_heads=1, head_dim=16,
                                     vocab_size=300)
MODEL = Decoder(CFG, rngs=nnx.Rngs(0))


def random_inputs(shape, seed):
    """Hidden states `[B, T, d]` at the scale that gives peaked and flat token distributions, and targets."""
    keys = jax.random.split(jax.random.key(seed), 4)
    hidden = 3.0 * jax.random.normal(keys[0], shape + (CFG.d_model,))
    other = hidden + jax.random.normal(keys[1], hidden.shape)
    targets = jax.random.randint(keys[2], shape, 0, CFG.vocab_size)
    weights = jax.random.uniform(keys[3], shape)  # a per-token cotangent that is not all ones
    return hidden, other, targets, weights


def direct_cross_entropy(hidden, targets):
    logits = MODEL.logits(hidden)
    return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]


def direct_kl(hidden_ref, hidden):
    p, q = jax.nn.log_softmax(MODEL.logits(hidden_ref)), jax.nn.log_softmax(MODEL.logits(hidden))
    return jnp.sum(jnp.exp(p) * (p - q), -1)


@pytest.mark.parametrize("shape,chunk", [((3, 10), 7), ((2, 8), 16), ((1, 5), 1), ((4, 6), 1024)])
@pytest.mark.parametrize("vocab_block", [7, 64, 4096])  # 50 blocks of 6 rows, 5 of 60, one of 300
@pytest.mark.parametrize("seed", [0, 1])
def test_cross_entropy_values_and_gradients_match_unchunked(shape, chunk, vocab_block, seed):
    hidden, _, targets, weights = random_inputs(shape, seed)
    ce = functools.partial(token_cross_entropy, MODEL, targets=targets, chunk_size=chunk, vocab_block=vocab_block)
    loss = jax.jit(ce)
    np.testing.assert_allclose(loss(hidden), direct_cross_entropy(hidden, targets), rtol=1e-5, atol=1e-5)
    grad = jax.jit(jax.grad(lambda h: jnp.sum(weights * ce(h))))
    expected = jax.grad(lambda h: jnp.sum(weights * direct_cross_entropy(h, targets)))(hidden)
    np.testing.assert_allclose(grad(hidden), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape,chunk", [((3, 10), 7), ((2, 8), 16)])
@pytest.mark.parametrize("seed", [0, 1])
def test_kl_values_and_gradients_match_unchunked(shape, chunk, seed):
    ref, hidden, _, weights = random_inputs(shape, seed)
    np.testing.assert_allclose(token_kl(MODEL, ref, hidden, chunk_size=chunk), direct_kl(ref, hidden),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(token_kl(MODEL, hidden, hidden, chunk_size=chunk), 0.0, atol=1e-5)
    d_ref, d_model = jax.grad(lambda r, h: jnp.sum(weights * token_kl(MODEL, r, h, chunk_size=chunk)),
                              argnums=(0, 1))(ref, hidden)
    expected = jax.grad(lambda h: jnp.sum(weights * direct_kl(jax.lax.stop_gradient(ref), h)))(hidden)
    np.testing.assert_allclose(d_model, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(d_ref, 0.0)  # the reference is a target


def test_bfloat16_hidden_gradient_is_bfloat16_and_close():
    hidden, _, targets, weights = random_inputs((2, 9), 3)
    low = hidden.astype(jnp.bfloat16)
    grad = jax.grad(lambda h: jnp.sum(weights * token_cross_entropy(MODEL, h, targets, chunk_size=4)))(low)
    assert grad.dtype == jnp.bfloat16
    expected = jax.grad(lambda h: jnp.sum(weights * direct_cross_entropy(h, targets)))(low.astype(jnp.float32))
    np.testing.assert_allclose(grad.astype(jnp.float32), expected, atol=0.05 * float(jnp.abs(expected).max()))


def test_gradient_costs_two_vocabulary_products_per_loss():
    """Differentiating the loss adds one `[tokens, V] x [V, d]` product, not a recomputation of the logits."""
    hidden, other, targets, _ = random_inputs((2, 16), 0)
    product = 2 * 32 * CFG.vocab_size * CFG.d_model
    ce = lambda h: jnp.sum(token_cross_entropy(MODEL, h, targets, chunk_size=8))  # noqa: E731
    kl = lambda h: jnp.sum(token_kl(MODEL, other, h, chunk_size=8))  # noqa: E731
    assert jaxpr_flops(jax.make_jaxpr(ce)(hidden)) == product
    assert jaxpr_flops(jax.make_jaxpr(jax.grad(ce))(hidden)) == 2 * product
    assert jaxpr_flops(jax.make_jaxpr(jax.grad(kl))(hidden)) == 3 * product


def test_bad_chunk_size_is_named():
    hidden, _, targets, _ = random_inputs((1, 4), 0)
    with pytest.raises(ValueError, match="chunk_size=0"):
        token_cross_entropy(MODEL, hidden, targets, chunk_size=0)


@pytest.mark.parametrize("vocab,block,blocks", [(262144, 1024, 256), (151936, 4096, 32), (300, 7, 50), (7919, 4096, 1)])
def test_vocabulary_blocks_tile_the_vocabulary_exactly(vocab, block, blocks):
    assert num_vocab_blocks(vocab, block) == blocks and vocab % blocks == 0


def test_bad_vocab_block_is_named():
    hidden, _, targets, _ = random_inputs((1, 4), 0)
    with pytest.raises(ValueError, match="vocab_block=0"):
        token_cross_entropy(MODEL, hidden, targets, vocab_block=0)
