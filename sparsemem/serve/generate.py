"""Batched text generation with a KV cache: left-padded prefill, then one jitted step per token.

Works with a `Decoder` (optional `Hooks` applied at every step) and with a
`CompactDecoder` (optional per-row `RowMemory`: its KV slots start the cache, its
LoRA applies at every step), so rows of one batch may use different domains.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsemem.models.decoder import Decoder, KVCache
from sparsemem.models.hooks import Hooks
from sparsemem.serve.compact_decoder import CompactDecoder, RowMemory
from sparsemem.tokenizer import Tokenizer


PROMPT_BUCKET = 16  # prompt lengths are padded up to a multiple of this


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """`temperature == 0` is greedy decoding; otherwise sample, optionally from the top-k logits."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")


def _pick(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k is not None:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("cache",))
def _step(graphdef, state, tokens, segment_ids, cache: KVCache, inputs: dict, key, sampling: SamplingConfig):
    """Run `tokens` through the model, append them to the cache, pick the next token per row."""
    model = nnx.merge(graphdef, state)
    hidden, cache = model(tokens, segment_ids=segment_ids, cache=cache, **inputs)
    return _pick(model.logits(hidden[:, -1]), key, sampling), cache


def bucket_length(prompt_len: int, max_new_tokens: int, max_seq_len: int) -> int:
    """The padded prompt length: a multiple of `PROMPT_BUCKET`, so prompts of similar length share compiled steps."""
    return min(-(-prompt_len // PROMPT_BUCKET) * PROMPT_BUCKET, max_seq_len - max_new_tokens)


def decode_steps(model: Decoder | CompactDecoder, prompts: list[list[int]], sampling: SamplingConfig,
                 hooks: Hooks | None = None, pad_id: int = 0,
                 memory: RowMemory | None = None) -> Iterator[np.ndarray]:
    """Prefill the prompts, then yield the next token id of every row (`[B]`), one step per `next`.

    Yields `max_new_tokens` times; a step runs only when the next value is asked for, so a
    caller that stops early (every row done, or its clients gone) computes nothing more.
    `hooks` go with a `Decoder`, `memory` (one row per prompt) with a `CompactDecoder`.
    With M memory slots the prompt's positions start at M (text follows the memory).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and every prompt needs at least one token")
    prompt_len = max(len(p) for p in prompts)
    if prompt_len + sampling.max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({sampling.max_new_tokens}) exceeds the "
                         f"model's context of {model.cfg.max_seq_len}; shorten the prompt or generate fewer tokens")
    prompt_len = bucket_length(prompt_len, sampling.max_new_tokens, model.cfg.max_seq_len)
    total = prompt_len + sampling.max_new_tokens
    batch = len(prompts)
    compact = isinstance(model, CompactDecoder)
    if (hooks is not None and compact) or (memory is not None and not compact):
        raise TypeError("pass hooks= with a Decoder and memory= with a CompactDecoder")
    rows = {x.shape[0] for x in jax.tree.leaves(memory)}
    if rows and rows != {batch}:
        raise ValueError(f"memory has {min(rows)} rows for {batch} prompts")
    tokens = np.full((batch, prompt_len), pad_id, np.int32)
    segments = np.zeros((batch, prompt_len), np.int32)
    for row, ids in enumerate(prompts):
        tokens[row, prompt_len - len(ids):] = ids
        segments[row, prompt_len - len(ids):] = 1

    graphdef, state = nnx.split(model)
    key = jax.random.key(sampling.seed)
    if compact:
        cache = model.init_cache(batch, total, memory)
    else:
        cache = model.init_cache(batch, total)
        if hooks is not None and hooks.memory_k is not None:  # text follows the memory slots, as in training runs
            cache = cache.replace(next_position=jnp.full((batch,), hooks.memory_k.shape[2], jnp.int32))
    inputs = {"memory": memory} if compact else {"hooks": hooks}
    key, sub = jax.random.split(key)
    next_ids, cache = _step(graphdef, state, jnp.asarray(tokens), jnp.asarray(segments), cache, inputs, sub,
                            sampling)
    ones = jnp.ones((batch, 1), jnp.int32)
    for t in range(sampling.max_new_tokens):
        ids = np.asarray(next_ids)
        yield ids
        if t == sampling.max_new_tokens - 1:
            return
        key, sub = jax.random.split(key)
        next_ids, cache = _step(graphdef, state, jnp.asarray(ids)[:, None], ones, cache, inputs, sub, sampling)


def generate_ids(model: Decoder | CompactDecoder, prompts: list[list[int]], sampling: SamplingConfig,
                 hooks: Hooks | None = None, pad_id: int = 0, eos_id: int | None = None,
                 memory: RowMemory | None = None) -> list[list[int]]:
    """Continue each prompt (token ids) until EOS or `max_new_tokens`; returns the new ids per row (no EOS).

    Arguments as in `decode_steps`.
    """
    results = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    for ids in decode_steps(model, prompts, sampling, hooks=hooks, pad_id=pad_id, memory=memory):
        if eos_id is not None:
            done |= ids == eos_id
        for row, token in enumerate(ids.tolist()):
            if not done[row]:
                results[row].append(token)
        if done.all():
            break
    return results


def generate_text(model: Decoder | CompactDecoder, tokenizer: Tokenizer, prompts: list[str],
                  sampling: SamplingConfig, hooks: Hooks | None = None, memory: RowMemory | None = None) -> list[str]:
    """Continue each text prompt; returns the decoded continuations."""
    ids = generate_ids(model, tokenizer.encode_batch(prompts), sampling, hooks=hooks, pad_id=tokenizer.pad_id,
                       eos_id=tokenizer.eos_id, memory=memory)
    return [tokenizer.decode(row) for row in ids]
