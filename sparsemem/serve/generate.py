"""Batched text generation with a KV cache: left-padded prefill, then one jitted step per token.

Works with a `Decoder` (optional `Hooks` applied at every step) and with a
`CompactDecoder` (optional per-row `RowMemory`: its KV slots start the cache, its
LoRA applies at every step), so rows of one batch may use different domains.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsemem.models.decoder import Decoder, KVCache
from sparsemem.models.hooks import Hooks
from sparsemem.serve.compact_model import CompactDecoder, RowMemory
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


def generate_ids(model: Decoder | CompactDecoder, prompts: list[list[int]], sampling: SamplingConfig,
                 hooks: Hooks | None = None, pad_id: int = 0, eos_id: int | None = None,
                 memory: RowMemory | None = None) -> list[list[int]]:
    """Continue each prompt (token ids) until EOS or `max_new_tokens`; returns the new ids per row (no EOS).

    `hooks` go with a `Decoder`, `memory` (one row per prompt) with a `CompactDecoder`.
    With M memory slots the prompt's positions start at M (text follows the memory).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and every prompt needs at least one token")
    prompt_len = max(len(p) for p in prompts)
    total = prompt_len + sampling.max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({sampling.max_new_tokens}) exceeds the "
                         f"model's context of {model.cfg.max_seq_len}; shorten the prompt or generate fewer tokens")
    # Left-pad to a bucket so prompts of similar length share one compiled prefill and decode step.
    prompt_len = min(-(-prompt_len // PROMPT_BUCKET) * PROMPT_BUCKET, model.cfg.max_seq_len - sampling.max_new_tokens)
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
    out = np.zeros((batch, sampling.max_new_tokens), np.int32)
    done = np.zeros(batch, bool)
    ones = jnp.ones((batch, 1), jnp.int32)
    for t in range(sampling.max_new_tokens):
        ids = np.asarray(next_ids)
        out[:, t] = ids
        if eos_id is not None:
            done |= ids == eos_id
        if done.all() or t == sampling.max_new_tokens - 1:
            break
        key, sub = jax.random.split(key)
        next_ids, cache = _step(graphdef, state, jnp.asarray(ids)[:, None], ones, cache, inputs, sub, sampling)
    results = []
    for row in out:
        ids = row.tolist()
        if eos_id is not None and eos_id in ids:
            ids = ids[: ids.index(eos_id)]
        results.append(ids[: sampling.max_new_tokens])
    return results


def generate_text(model: Decoder | CompactDecoder, tokenizer: Tokenizer, prompts: list[str],
                  sampling: SamplingConfig, hooks: Hooks | None = None, memory: RowMemory | None = None) -> list[str]:
    """Continue each text prompt; returns the decoded continuations."""
    ids = generate_ids(model, tokenizer.encode_batch(prompts), sampling, hooks=hooks, pad_id=tokenizer.pad_id,
                       eos_id=tokenizer.eos_id, memory=memory)
    return [tokenizer.decode(row) for row in ids]
