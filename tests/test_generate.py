"""Cached generation equals naive full-recompute greedy decoding, per row and batched."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsemem.models.decoder import Decoder
from sparsemem.serve.generate import SamplingConfig, generate_ids
from test_decoder import TINY_GEMMA, forward


def naive_greedy(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        hidden, _ = forward(model, jnp.asarray([ids]), {})
        ids.append(int(jnp.argmax(model.logits(hidden[:, -1]))))
    return ids[len(prompt):]


def test_greedy_batch_equals_naive_per_row():
    model = Decoder(TINY_GEMMA, rngs=nnx.Rngs(0))
    prompts = [[2, 5, 9, 11, 40, 7, 3], [2, 8]]
    batched = generate_ids(model, prompts, SamplingConfig(max_new_tokens=6))
    for prompt, got in zip(prompts, batched):
        assert got == naive_greedy(model, prompt, 6)


def test_sampling_is_seeded_and_stops_at_eos():
    model = Decoder(TINY_GEMMA, rngs=nnx.Rngs(1))
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=20, seed=3)
    first = generate_ids(model, [[2, 4, 6]], sampling)
    assert first == generate_ids(model, [[2, 4, 6]], sampling)
    eos = first[0][2]
    stopped = generate_ids(model, [[2, 4, 6]], sampling, eos_id=eos)
    assert stopped[0] == first[0][: first[0].index(eos)]


def test_bad_requests_are_refused():
    model = Decoder(TINY_GEMMA.replace(max_seq_len=16), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="exceeds the model's context of 16"):
        generate_ids(model, [[1] * 10], SamplingConfig(max_new_tokens=7))
    with pytest.raises(ValueError, match="at least one token"):
        generate_ids(model, [[]], SamplingConfig())
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)
