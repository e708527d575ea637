"""Batched text generation with a KV cache: left-padded prefill, then one jitted step per token.

Works with a `Decoder` (optional `Hooks` applied at every step) and with a
`CompactDecoder` (optional per-row `RowMemory`: its KV slots start the cache, its
LoRA applies at every step), so rows of one batch may use different domains.
"""

from __future__ import annotations

import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsemem.models.decoder import Decoder, KVCache
from sparsemem.models.hooks import Hooks
from sparsemem.serve.compact_decoder import CompactDecoder, RowMemory
from sparsemem.serve.sampling import Picked, SamplingConfig, SamplingRows, pick
from sparsemem.tokenizer import Tokenizer


PROMPT_BUCKET = 16  # prompt lengths are padded up to a multiple of this


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _step(graphdef, state, tokens, segment_ids, cache: KVCache, inputs: dict, rows: SamplingRows, step):
    """Run `tokens` through the model, append them to the cache, pick the next token per row (`Picked`)."""
    model = nnx.merge(graphdef, state)
    hidden, cache = model(tokens, segment_ids=segment_ids, cache=cache, **inputs)
    return pick(model.logits(hidden[:, -1]), rows, step), cache


def bucket_length(prompt_len: int, max_new_tokens: int, max_seq_len: int) -> int:
    """The padded prompt length: a multiple of `PROMPT_BUCKET`, so prompts of similar length share compiled steps."""
    return min(-(-prompt_len // PROMPT_BUCKET) * PROMPT_BUCKET, max_seq_len - max_new_tokens)


def decode_steps(model: Decoder | CompactDecoder, prompts: list[list[int]],
                 sampling: SamplingConfig | Sequence[SamplingConfig], hooks: Hooks | None = None, pad_id: int = 0,
                 memory: RowMemory | None = None, steps: int | None = None) -> Iterator[Picked]:
    """Prefill the prompts, then yield every row's next token (`Picked`, host arrays `[B]`), one step per `next`.

    `sampling` is one config for every row or one per prompt; the rows decode for `steps`
    tokens (default: the largest `max_new_tokens`). A step runs only when the next value is
    asked for, so a caller that stops early (every row done, or its clients gone) computes
    nothing more. `hooks` go with a `Decoder`, `memory` (one row per prompt) with a
    `CompactDecoder`. With M memory slots the prompt's positions start at M (text follows the memory).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and every prompt needs at least one token")
    configs = [sampling] * len(prompts) if isinstance(sampling, SamplingConfig) else list(sampling)
    if len(configs) != len(prompts):
        raise ValueError(f"{len(configs)} sampling configs for {len(prompts)} prompts")
    steps = steps or max(c.max_new_tokens for c in configs)
    prompt_len = max(len(p) for p in prompts)
    if prompt_len + steps > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({steps}) exceeds the "
                         f"model's context of {model.cfg.max_seq_len}; shorten the prompt or generate fewer tokens")
    prompt_len = bucket_length(prompt_len, steps, model.cfg.max_seq_len)
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
    if compact:
        cache = model.init_cache(batch, prompt_len + steps, memory)
    else:
        cache = model.init_cache(batch, prompt_len + steps)
        if hooks is not None and hooks.memory_k is not None:  # text follows the memory slots, as in training runs
            cache = cache.replace(next_position=jnp.full((batch,), hooks.memory_k.shape[2], jnp.int32))
    inputs = {"memory": memory} if compact else {"hooks": hooks}
    settings = SamplingRows.of(configs)
    picked, cache = _step(graphdef, state, jnp.asarray(tokens), jnp.asarray(segments), cache, inputs, settings,
                          np.zeros(batch, np.int32))
    ones = jnp.ones((batch, 1), jnp.int32)
    for t in range(steps):
        picked = jax.device_get(picked)
        yield picked
        if t == steps - 1:
            return
        picked, cache = _step(graphdef, state, jnp.asarray(picked.ids)[:, None], ones, cache, inputs, settings,
                              np.full(batch, t + 1, np.int32))


def generate_ids(model: Decoder | CompactDecoder, prompts: list[list[int]],
                 sampling: SamplingConfig | Sequence[SamplingConfig], hooks: Hooks | None = None, pad_id: int = 0,
                 eos_id: int | None = None, memory: RowMemory | None = None) -> list[list[int]]:
    """Continue each prompt (token ids) until EOS or its `max_new_tokens`; returns the new ids per row (no EOS).

    Arguments as in `decode_steps`.
    """
    configs = [sampling] * len(prompts) if isinstance(sampling, SamplingConfig) else list(sampling)
    results = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    for t, picked in enumerate(decode_steps(model, prompts, configs, hooks=hooks, pad_id=pad_id, memory=memory)):
        if eos_id is not None:
            done |= picked.ids == eos_id
        done |= np.asarray([t >= c.max_new_tokens for c in configs])
        for row, token in enumerate(picked.ids.tolist()):
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
