"""Token losses over a huge vocabulary, with the gradient fused into the forward pass.

Full logits for a batch (`B*T x V`, V = 262,144 for Gemma) would dominate memory, so
tokens are processed `chunk_size` at a time under `lax.scan`. The losses are custom-VJP
functions whose forward pass, when differentiated, also computes the gradient with
respect to the hidden states and keeps only that `[tokens, d]` array: no logits are
stored or recomputed, so a train step costs two vocabulary products per cross-entropy
instead of three (forward, rematerialised forward, backward). Undifferentiated calls
(evaluation) compute the values only.

Cross-entropy also splits the vocabulary into blocks of about `VOCAB_BLOCK` rows and
runs an online log-sum-exp over them, as flash attention does over keys:
`softmax(h E^T) E` is attention whose keys and values are both the unembedding `E`, so
the running sum of `exp(logit - max) * row` is rescaled whenever the running max grows.
No `[chunk, V]` array exists; each `[chunk, block]` block of logits is consumed while it
is still in cache. The KL needs both distributions' normalisers before its gradient
`(softmax - softmax_ref) @ E` can be formed, so it keeps whole-vocabulary logits per
token chunk (three vocabulary products).

The unembedding is treated as frozen and the KL's reference hidden states as a
target: neither gets a gradient (the KOFF backbone never trains either).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from sparsemem.models.decoder import Decoder

VOCAB_BLOCK = 1024  # rows of the unembedding per online-softmax block (see the module docstring)


def _logits(unembed: jax.Array, hidden: jax.Array) -> jax.Array:
    return jnp.einsum("cd,vd->cv", hidden, unembed, preferred_element_type=jnp.float32)


def _to_hidden(unembed: jax.Array, dlogits: jax.Array) -> jax.Array:
    """Gradient w.r.t. the hidden states `[C, d]` of a gradient w.r.t. the logits `[C, V]`."""
    return jnp.einsum("cv,vd->cd", dlogits.astype(unembed.dtype), unembed, preferred_element_type=jnp.float32)


def num_vocab_blocks(vocab: int, block: int = VOCAB_BLOCK) -> int:
    """The divisor of `vocab` nearest `vocab / block`: blocks of about `block` rows that tile it exactly."""
    want = max(1, round(vocab / block))
    return min((n for n in range(1, vocab + 1) if vocab % n == 0), key=lambda n: (abs(n - want), n))


def _online_softmax(unembed: jax.Array, hidden: jax.Array, num_blocks: int, with_grad: bool):
    """`(logsumexp [C], softmax @ unembed [C, d] or None)` of the logits `hidden @ unembed^T`, block by block.

    Block `j` holds the rows `j, j + num_blocks, ...`: the reshape is free, and a vocabulary
    sharding of the unembedding's first axis stays on the block rows.
    """
    blocks = unembed.reshape(-1, num_blocks, unembed.shape[-1])
    c, d = hidden.shape

    def step(carry, j):
        top, total, weighted = carry
        rows = blocks[:, j]
        logits = _logits(rows, hidden)
        new_top = jnp.maximum(top, jnp.max(logits, axis=-1))
        p = jnp.exp(logits - new_top[:, None])
        rescale = jnp.exp(top - new_top)
        total = total * rescale + jnp.sum(p, axis=-1)
        if weighted is not None:
            weighted = weighted * rescale[:, None] + _to_hidden(rows, p)
        return (new_top, total, weighted), None

    init = (jnp.full((c,), -jnp.inf, jnp.float32), jnp.zeros((c,), jnp.float32),
            jnp.zeros((c, d), jnp.float32) if with_grad else None)
    (top, total, weighted), _ = jax.lax.scan(step, init, jnp.arange(num_blocks))
    return top + jnp.log(total), None if weighted is None else weighted / total[:, None]


def _cross_entropy(unembed, targets, hidden, with_grad: bool, *, num_blocks: int):
    lse, expected_row = _online_softmax(unembed, hidden, num_blocks, with_grad)
    target_rows = jnp.take(unembed, targets, axis=0).astype(jnp.float32)
    loss = lse - jnp.sum(hidden.astype(jnp.float32) * target_rows, axis=-1)
    return loss, None if expected_row is None else expected_row - target_rows


def _kl(unembed, hidden_ref, hidden, with_grad: bool):
    ref_logp = jax.nn.log_softmax(_logits(unembed, hidden_ref), axis=-1)
    logp = jax.nn.log_softmax(_logits(unembed, hidden), axis=-1)
    ref_p = jnp.exp(ref_logp)
    loss = jnp.sum(ref_p * (ref_logp - logp), axis=-1)
    if not with_grad:
        return loss, None
    return loss, _to_hidden(unembed, jnp.exp(logp) - ref_p)


def _scan_chunks(fn: Callable, unembed: jax.Array, arrays: tuple[jax.Array, ...], with_grad: bool):
    """`fn(unembed, *chunk_arrays, with_grad)` over `[n_chunks, chunk, ...]` arrays: `([n, chunk], grads)`."""
    _, (loss, grad) = jax.lax.scan(lambda _, xs: (None, fn(unembed, *xs, with_grad)), None, arrays)
    return loss, grad


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_loss(fn: Callable, unembed: jax.Array, arrays: tuple[jax.Array, ...]) -> jax.Array:
    """Per-token loss of `fn` over chunked arrays; only the last array gets a gradient."""
    return _scan_chunks(fn, unembed, arrays, False)[0]


def _chunked_loss_fwd(fn, unembed, arrays):
    loss, grad = _scan_chunks(fn, unembed, arrays, True)
    return loss, (grad.astype(arrays[-1].dtype), arrays)


def _chunked_loss_bwd(fn, residuals, g):
    grad, arrays = residuals
    zeros = [jnp.zeros_like(a) if jnp.issubdtype(a.dtype, jnp.floating) else None for a in arrays[:-1]]
    d_last = (g[..., None] * grad).astype(arrays[-1].dtype)
    return None, (*zeros, d_last)


_chunked_loss.defvjp(_chunked_loss_fwd, _chunked_loss_bwd)


def _token_loss(fn: Callable, unembed: jax.Array, arrays: tuple[jax.Array, ...], chunk_size: int) -> jax.Array:
    """Flatten `[B, T, ...]` arrays to padded `[n_chunks, chunk, ...]`, apply the chunked loss; `[B, T]` out."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1 (tokens per loss chunk; koff.loss_chunk)")
    b, t = arrays[0].shape[:2]
    n = b * t
    chunk = min(chunk_size, n)
    pad = (-n) % chunk
    flat = [jnp.pad(a.reshape((n,) + a.shape[2:]), [(0, pad)] + [(0, 0)] * (a.ndim - 2)) for a in arrays]
    chunks = tuple(a.reshape((-1, chunk) + a.shape[1:]) for a in flat)
    out = _chunked_loss(fn, jax.lax.stop_gradient(unembed), chunks)
    return out.reshape(-1)[:n].reshape(b, t)


def token_cross_entropy(model: Decoder, hidden: jax.Array, targets: jax.Array, *,
                        chunk_size: int = 1024, vocab_block: int = VOCAB_BLOCK) -> jax.Array:
    """Per-token next-token cross-entropy `[B, T]` (nats) from final hidden states `[B, T, d]`.

    Differentiable w.r.t. `hidden` only (see the module docstring). `vocab_block`: about
    how many unembedding rows each online-softmax block holds.
    """
    if vocab_block < 1:
        raise ValueError(f"vocab_block={vocab_block} must be >= 1 (unembedding rows per online-softmax block)")
    unembed = model.unembedding().astype(hidden.dtype)
    fn = functools.partial(_cross_entropy, num_blocks=num_vocab_blocks(unembed.shape[0], vocab_block))
    return _token_loss(fn, unembed, (targets.astype(jnp.int32), hidden), chunk_size)


def token_kl(model: Decoder, hidden_ref: jax.Array, hidden: jax.Array, *, chunk_size: int = 1024) -> jax.Array:
    """Per-token KL(ref || model) `[B, T]` between two sets of hidden states through the same unembedding.

    Differentiable w.r.t. `hidden` only: `hidden_ref` is the target distribution.
    """
    unembed = model.unembedding().astype(hidden.dtype)
    return _token_loss(_kl, unembed, (jax.lax.stop_gradient(hidden_ref), hidden), chunk_size)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `values` over positions where `mask` is non-zero (0 if none)."""
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)
