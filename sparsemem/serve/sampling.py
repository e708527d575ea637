"""Sampling settings as data: per-row temperature, top-k, top-p and seed, so one compiled step serves any mix.

`SamplingConfig` is one request's settings (checked on construction); `SamplingRows`
stacks a batch's settings into arrays that enter the compiled step as ordinary inputs,
so a new temperature or seed never compiles anything. `pick` chooses each row's next
token: greedy where the temperature is 0, else a draw from the temperature-scaled
logits, cut to the top-k and then to the top-p nucleus (as Hugging Face's warpers do).
Row r's token number t is drawn with `fold_in(key(seed_r), t)`: a request's samples depend
only on its own seed and logits, never on the rows that happen to share its batch.
Log-probabilities are those of the model's own distribution (before temperature).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

TOP_LOGPROBS = 20  # the most alternatives per token a request may ask for (OpenAI's limit)
SEED_LIMIT = 2 ** 64  # seeds are unsigned 64-bit integers


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """One request's decoding settings; `temperature == 0` is greedy decoding.

    `top_k` None keeps every token, `top_p` 1 the whole distribution; `logprobs` is the
    number of most likely alternatives reported per token (None: no log-probabilities).
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int = 0
    logprobs: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        if self.logprobs is not None and not 0 <= self.logprobs <= TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {TOP_LOGPROBS}], got {self.logprobs}")


@struct.dataclass
class SamplingRows:
    """A batch's settings as arrays `[B]` (`seed [B, 2]`: high and low 32 bits; `top_k` 0: no cut)."""

    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    seed: np.ndarray
    logprobs: np.ndarray

    @classmethod
    def of(cls, configs: Sequence[SamplingConfig]) -> "SamplingRows":
        return cls(temperature=np.asarray([c.temperature for c in configs], np.float32),
                   top_k=np.asarray([c.top_k or 0 for c in configs], np.int32),
                   top_p=np.asarray([c.top_p for c in configs], np.float32),
                   seed=np.asarray([(c.seed >> 32, c.seed & 0xFFFFFFFF) for c in configs], np.uint32).reshape(-1, 2),
                   logprobs=np.asarray([c.logprobs or 0 for c in configs], np.int32))

    def set_row(self, row: int, config: SamplingConfig) -> None:
        """Overwrite row `row` (host arrays) with `config`."""
        one = SamplingRows.of([config])
        for name in ("temperature", "top_k", "top_p", "seed", "logprobs"):
            getattr(self, name)[row] = getattr(one, name)[0]


@struct.dataclass
class Picked:
    """The chosen token of every row `[B]`, its log-probability, and the `TOP_LOGPROBS` likeliest tokens
    `[B, TOP_LOGPROBS]` with theirs (zeros unless some row asked for log-probabilities)."""

    ids: jax.Array
    logprob: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


def _cut(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """`scaled [B, V]` with tokens outside each row's top-k, then outside its top-p nucleus, set to -inf (the
    likeliest token always stays)."""
    vocab = scaled.shape[-1]
    ordered = -jnp.sort(-scaled, axis=-1)
    rank = jnp.arange(vocab)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    ordered = jnp.where(rank < k[:, None], ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the likelier tokens
    kept = ((before < top_p[:, None]) | (rank == 0)) & (rank < k[:, None])
    threshold = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled < threshold, -jnp.inf, scaled)


def _row_key(seed: jax.Array, step: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed[0]), seed[1]), step)


def pick(logits: jax.Array, rows: SamplingRows, step: jax.Array) -> Picked:
    """Choose each row's next token from `logits [B, V]`; `step [B]` is the index of the token being chosen.

    The sort that top-k/top-p need, the draw and the alternatives each run only when
    some row needs them (`lax.cond`), so greedy batches pay for none of them.
    """
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled = rows.temperature > 0

    def draw(_):
        scaled = logits / jnp.where(sampled, rows.temperature, 1.0)[:, None]
        scaled = jax.lax.cond(jnp.any((rows.top_k > 0) | (rows.top_p < 1)), _cut, lambda x, *_: x, scaled,
                              rows.top_k, rows.top_p)
        keys = jax.vmap(_row_key)(rows.seed, step)
        drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        return jnp.where(sampled, drawn, greedy)

    ids = jax.lax.cond(jnp.any(sampled), draw, lambda _: greedy, None)
    shape = (logits.shape[0], min(TOP_LOGPROBS, logits.shape[1]))
    top_logprobs, top_ids = jax.lax.cond(
        jnp.any(rows.logprobs > 0), lambda lp: tuple(jax.lax.top_k(lp, shape[1])),
        lambda lp: (jnp.zeros(shape, lp.dtype), jnp.zeros(shape, jnp.int32)), logp)
    chosen = jnp.take_along_axis(logp, ids[:, None], axis=-1)[:, 0]
    return Picked(ids=ids, logprob=chosen, top_ids=top_ids.astype(jnp.int32), top_logprobs=top_logprobs)
