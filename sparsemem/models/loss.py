"""Token losses over a huge vocabulary, computed in chunks of tokens with a fused gradient.

Full logits for a batch (`B*T x V`, V = 262,144 for Gemma) would dominate memory, so
tokens are processed `chunk_size` at a time under `lax.scan`. The losses are custom-VJP
functions whose forward pass, when differentiated, also computes the gradient with
respect to the hidden states chunk by chunk (`(softmax - target) @ unembedding`) and
keeps only that `[tokens, d]` array: no `[chunk, V]` logits are stored or recomputed,
so a train step costs two vocabulary products per loss instead of three (forward,
rematerialised forward, backward). Undifferentiated calls (evaluation) compute the
values only.

The unembedding is treated as frozen and the KL's reference hidden states as a
target: neither gets a gradient (the KOFF backbone never trains either).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from sparsemem.models.decoder import Decoder


def _logits(unembed: jax.Array, hidden: jax.Array) -> jax.Array:
    return jnp.einsum("cd,vd->cv", hidden, unembed, preferred_element_type=jnp.float32)


def _to_hidden(unembed: jax.Array, dlogits: jax.Array) -> jax.Array:
    """Gradient w.r.t. the hidden states `[C, d]` of a gradient w.r.t. the logits `[C, V]`."""
    return jnp.einsum("cv,vd->cd", dlogits.astype(unembed.dtype), unembed, preferred_element_type=jnp.float32)


def _cross_entropy(unembed, targets, hidden, with_grad: bool):
    logits = _logits(unembed, hidden)
    lse = jax.nn.logsumexp(logits, axis=-1)
    loss = lse - jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    if not with_grad:
        return loss, None
    onehot = jnp.arange(logits.shape[-1])[None, :] == targets[:, None]
    return loss, _to_hidden(unembed, jnp.exp(logits - lse[:, None]) - onehot)


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
                        chunk_size: int = 1024) -> jax.Array:
    """Per-token next-token cross-entropy `[B, T]` (nats) from final hidden states `[B, T, d]`.

    Differentiable w.r.t. `hidden` only (see the module docstring).
    """
    unembed = model.unembedding().astype(hidden.dtype)
    return _token_loss(_cross_entropy, unembed, (targets.astype(jnp.int32), hidden), chunk_size)


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
