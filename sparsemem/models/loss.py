"""Token losses computed in vocabulary-sized chunks of tokens.

Full logits for a batch (`B*T x V`, V = 262,144 for Gemma) would dominate memory, so
tokens are processed `chunk_size` at a time under `lax.scan`, and each chunk's logits
are recomputed in the backward pass (`jax.checkpoint`) instead of being stored.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from sparsemem.models.decoder import Decoder


def _map_token_chunks(fn: Callable[..., jax.Array], unembed: jax.Array, arrays: tuple[jax.Array, ...],
                      chunk_size: int) -> jax.Array:
    """Apply `fn(unembed, *chunk_arrays) -> [C]` over token chunks of `[B, T, ...]` arrays; `[B, T]` out."""
    b, t = arrays[0].shape[:2]
    n = b * t
    chunk = min(chunk_size, n)
    pad = (-n) % chunk
    flat = [jnp.pad(a.reshape((n,) + a.shape[2:]), [(0, pad)] + [(0, 0)] * (a.ndim - 2)) for a in arrays]
    chunks = [a.reshape((-1, chunk) + a.shape[1:]) for a in flat]
    step = jax.checkpoint(lambda _, xs: (None, fn(unembed, *xs)))
    _, out = jax.lax.scan(step, None, tuple(chunks))
    return out.reshape(-1)[:n].reshape(b, t)


def _logits(unembed: jax.Array, hidden: jax.Array) -> jax.Array:
    return jnp.einsum("cd,vd->cv", hidden, unembed, preferred_element_type=jnp.float32)


def _cross_entropy_chunk(unembed, hidden, targets):
    logits = _logits(unembed, hidden)
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def _kl_chunk(unembed, hidden_ref, hidden):
    ref_logp = jax.nn.log_softmax(_logits(unembed, hidden_ref), axis=-1)
    logp = jax.nn.log_softmax(_logits(unembed, hidden), axis=-1)
    return jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)


def token_cross_entropy(model: Decoder, hidden: jax.Array, targets: jax.Array, *,
                        chunk_size: int = 1024) -> jax.Array:
    """Per-token next-token cross-entropy `[B, T]` (nats) from final hidden states `[B, T, d]`."""
    unembed = model.unembedding().astype(hidden.dtype)
    return _map_token_chunks(_cross_entropy_chunk, unembed, (hidden, targets.astype(jnp.int32)), chunk_size)


def token_kl(model: Decoder, hidden_ref: jax.Array, hidden: jax.Array, *, chunk_size: int = 1024) -> jax.Array:
    """Per-token KL(ref || model) `[B, T]` between two sets of hidden states through the same unembedding."""
    unembed = model.unembedding().astype(hidden.dtype)
    return _map_token_chunks(_kl_chunk, unembed, (hidden_ref, hidden), chunk_size)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `values` over positions where `mask` is non-zero (0 if none)."""
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)
