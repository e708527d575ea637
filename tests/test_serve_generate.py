"""Generation with domain memory on the compacted backbone: per-row equality, masked reference, host offload."""

import jax.numpy as jnp
import numpy as np
import pytest

from sparsemem.koff.memory import hooks_from_rows, prefill_kv
from sparsemem.models.hooks import Hooks
from sparsemem.serve.compaction import CompactLayout, compact_decoder
from sparsemem.serve.generate import SamplingConfig, generate_ids
from sparsemem.serve.memory import MemoryBank, UnknownDomainError
from test_serve_compact import DOMAINS, hard_masks, random_decoder, random_table, tiny

PROMPTS = [[2, 5, 9, 11, 40, 7, 3], [2, 8], [2, 17, 33, 4]]  # prompt + 6 new tokens > sliding window 5
NAMES = ["de", "en", "fr"]
GREEDY = SamplingConfig(max_new_tokens=6)


@pytest.fixture(scope="module")
def setup():
    cfg = tiny("gemma3")
    decoder, masks, table = random_decoder(cfg), hard_masks(cfg), random_table(cfg)
    layout = CompactLayout.from_masks(cfg, masks)
    return cfg, decoder, masks, table, compact_decoder(decoder, layout), MemoryBank(cfg, layout, DOMAINS, table, 0.7)


def test_mixed_domain_batch_equals_rows_and_masked_model(setup):
    cfg, decoder, masks, table, model, bank = setup
    batched = generate_ids(model, PROMPTS, GREEDY, memory=bank.rows(NAMES))
    for prompt, name, got in zip(PROMPTS, NAMES, batched):
        assert got == generate_ids(model, [prompt], GREEDY, memory=bank.rows([name]))[0]
    # The masked (uncompacted) model with the same per-row memory through `Hooks` picks the same tokens.
    memory = hooks_from_rows({k: jnp.asarray(v) for k, v in table.items()}, jnp.asarray(bank.domain_ids(NAMES)), 0.7)
    hooks = Hooks(head_scale=jnp.asarray(masks["head"]), neuron_scale=jnp.asarray(masks["neuron"]),
                  memory_k=memory.memory_k, memory_v=memory.memory_v, lora=memory.lora)
    assert batched == generate_ids(decoder, PROMPTS, GREEDY, hooks=hooks)
    # Domains change the output (otherwise the test above proves little).
    assert generate_ids(model, PROMPTS, GREEDY, memory=bank.rows(["en"] * 3)) != batched


def test_sampling_is_seeded_and_stops_at_eos(setup):
    *_, model, bank = setup
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=20, seed=5)
    first = generate_ids(model, PROMPTS[:1], sampling, memory=bank.rows(["fr"]))
    assert first == generate_ids(model, PROMPTS[:1], sampling, memory=bank.rows(["fr"]))
    eos = first[0][3]
    stopped = generate_ids(model, PROMPTS[:1], sampling, memory=bank.rows(["fr"]), eos_id=eos)
    assert stopped[0] == first[0][: first[0].index(eos)]


def test_unknown_domain_lists_known_ones(setup):
    bank = setup[-1]
    with pytest.raises(UnknownDomainError, match="unknown domain.*'xx'.*known domains: en, de, fr"):
        bank.rows(["en", "xx"])


def test_host_offloaded_table_moves_only_fetched_rows_to_device(setup):
    cfg, decoder, masks, table, model, bank = setup
    hosted = MemoryBank(cfg, bank.layout, DOMAINS, table, 0.7, offload=True)
    for layer in hosted.layers:
        assert {x.sharding.memory_kind for x in layer.values()} == {"pinned_host"}
    assert {x.sharding.memory_kind for x in bank.layers[0].values()} == {"device"}
    ids = jnp.asarray([2, 0], jnp.int32)
    text = hosted._fetch.lower(hosted.layers, ids).as_text()
    assert 'memory_kind = "pinned_host"' in text.split("->")[0]  # the program's inputs live in host memory
    fetched = hosted.fetch([2, 0])
    for got, want in zip(fetched, bank.fetch([2, 0])):
        for name in want:
            assert got[name].sharding.memory_kind == "device"
            np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]))
    assert generate_ids(model, PROMPTS, GREEDY, memory=hosted.rows(NAMES)) == \
        generate_ids(model, PROMPTS, GREEDY, memory=bank.rows(NAMES))


def test_memory_rows_must_match_the_batch(setup):
    *_, model, bank = setup
    with pytest.raises(ValueError, match="memory has 2 rows for 3 prompts"):
        generate_ids(model, PROMPTS, GREEDY, memory=bank.rows(NAMES[:2]))


def test_prefill_memory_acts_as_the_prefix_it_was_made_from():
    """Memory = the model's own keys/values over P, text positions after it: same as prompting with P + X."""
    cfg = tiny("llama")  # no sliding window: a real prefix stays visible too
    decoder = random_decoder(cfg)
    prefix, prompt = [2, 31, 7, 99, 14], [23, 5, 61]
    k, v = prefill_kv(decoder, jnp.asarray([prefix], jnp.int32))
    layout = CompactLayout.full(cfg)
    bank = MemoryBank(cfg, layout, ["p"], {"k": np.asarray(k), "v": np.asarray(v)}, 1.0)
    got = generate_ids(compact_decoder(decoder, layout), [prompt], GREEDY, memory=bank.rows(["p"]))
    assert got == generate_ids(decoder, [prefix + prompt], GREEDY)
    assert got != generate_ids(decoder, [prompt], GREEDY)
