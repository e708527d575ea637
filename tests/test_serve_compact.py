"""Compacted backbone == masked model (with per-row domain memory), parameter counts, width rounding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsemem.koff import sparsity
from sparsemem.koff.memory import hooks_from_rows
from sparsemem.models.config import preset
from sparsemem.models.decoder import Decoder
from sparsemem.models.hooks import PROJECTIONS, Hooks, projection_shape
from sparsemem.models.layers import segment_positions
from sparsemem.serve.compaction import CompactLayout, compact_decoder, prunable_params, round_masks
from sparsemem.serve.memory import MemoryBank

SHAPE = dict(num_layers=3, d_model=64, d_ff=96, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=160)
FAMILIES = {"gemma3": "gemma-3-270m", "llama": "llama-3.2-1b", "qwen2": "qwen2.5-3b", "qwen3": "qwen3-0.6b"}
DOMAINS = ("en", "de", "fr")
SLOTS, RANK = 3, 2


def tiny(family):
    extra = {"sliding_window": 5, "layer_types": ("local", "local", "global")} if family == "gemma3" else {}
    return preset(FAMILIES[family]).replace(**SHAPE, **extra, tie_embeddings=family in ("gemma3", "qwen2"))


def random_decoder(cfg, seed=0):
    """Every parameter (norms, biases too) random, so no unit is trivially inert.

    Embeddings are small, so the blocks rather than the (tied) embedding of the last
    token decide the next one: greedy generation then depends on masks and memory.
    """
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        std = 0.02 if path == ("embed",) else 0.2
        var.set_value(jnp.asarray(std * rng.standard_normal(var.shape, np.float32)))
    return model


def random_table(cfg, seed=1, domains=len(DOMAINS)):
    """A full-width memory table: KV memory and non-zero LoRA on every projection."""
    rng = np.random.default_rng(seed)
    L = cfg.num_layers
    table = {name: rng.standard_normal((domains, L, SLOTS, cfg.num_kv_heads, cfg.head_dim), np.float32)
             for name in ("k", "v")}
    for proj in PROJECTIONS:
        fan_in, fan_out = projection_shape(cfg, proj)
        table[f"{proj}_a"] = 0.3 * rng.standard_normal((domains, L, fan_in, RANK), np.float32)
        table[f"{proj}_b"] = 0.3 * rng.standard_normal((domains, L, RANK, fan_out), np.float32)
    return table


def hard_masks(cfg, seed=0):
    """Layer 0 loses KV group 1 entirely, layer 1 every head and neuron, layer 2 one head (ragged groups)."""
    head = np.ones((cfg.num_layers, cfg.num_heads), np.float32)
    head[0, 2:] = 0
    head[1, :] = 0
    head[2, 1] = 0
    neuron = (np.random.default_rng(seed).random((cfg.num_layers, cfg.d_ff)) > 0.5).astype(np.float32)
    neuron[1] = 0
    return {"head": head, "neuron": neuron}


@jax.jit
def masked_logits(model_state, graphdef, tokens, segments, positions, hooks):
    model = nnx.merge(graphdef, model_state)
    hidden, _ = model(tokens, segment_ids=segments, positions=positions, hooks=hooks)
    return model.logits(hidden)


def reference_logits(decoder, masks, table, domain_ids, tokens, segments, lora_scale):
    """The masked model with each row's memory, through the training-time `Hooks` seam."""
    rows = {k: jnp.asarray(v) for k, v in table.items()}
    memory = hooks_from_rows(rows, jnp.asarray(domain_ids), lora_scale)
    hooks = Hooks(head_scale=jnp.asarray(masks["head"]), neuron_scale=jnp.asarray(masks["neuron"]),
                  memory_k=memory.memory_k, memory_v=memory.memory_v, lora=memory.lora)
    graphdef, state = nnx.split(decoder)
    positions = segment_positions(segments) + SLOTS  # text follows the memory
    return masked_logits(state, graphdef, tokens, segments, positions, hooks)


@nnx.jit
def compact_logits(model, tokens, segments, memory):
    hidden, _ = model(tokens, segment_ids=segments, memory=memory)
    return model.logits(hidden)


def batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(1, 160, (3, 11)), jnp.int32)
    segments = jnp.ones((3, 11), jnp.int32).at[1, :4].set(0).at[2, 6:].set(2)  # padding; two packed documents
    return tokens, segments


@pytest.mark.parametrize("family", list(FAMILIES))
def test_compacted_equals_masked_with_memory(family):
    cfg = tiny(family)
    decoder, masks, table = random_decoder(cfg), hard_masks(cfg), random_table(cfg)
    layout = CompactLayout.from_masks(cfg, masks)
    assert layout.kv_heads == ((0,), (), (0, 1)) and layout.heads[1] == ()
    model = compact_decoder(decoder, layout)
    bank = MemoryBank(cfg, layout, DOMAINS, table, lora_scale=0.7)
    names = ["de", "en", "de"]
    tokens, segments = batch()
    got = compact_logits(model, tokens, segments, bank.rows(names))
    want = reference_logits(decoder, masks, table, bank.domain_ids(names), tokens, segments, 0.7)
    valid = np.asarray(segments) != 0
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-5, rtol=1e-5)
    # The memory matters: without it the logits differ.
    plain = compact_logits(model, tokens, segments, None)
    assert np.abs(np.asarray(plain) - np.asarray(got))[valid].max() > 1e-2


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_masks_and_parameter_count(family, seed):
    cfg = tiny(family)
    decoder, table = random_decoder(cfg, seed), random_table(cfg, seed)
    rng = np.random.default_rng(seed + 7)
    log_alphas = {"head": jnp.asarray(3 * rng.standard_normal((cfg.num_layers, cfg.num_heads)), jnp.float32),
                  "neuron": jnp.asarray(3 * rng.standard_normal((cfg.num_layers, cfg.d_ff)), jnp.float32)}
    masks = jax.tree.map(np.asarray, sparsity.deterministic_masks(cfg, log_alphas, 0.5))
    model = compact_decoder(decoder, CompactLayout.from_masks(cfg, masks))
    counts = sparsity.ParamCounts.of(cfg)
    remaining = int(sparsity.remaining_params(cfg, masks))
    assert prunable_params(model) == remaining
    assert model.num_params() == counts.total - counts.prunable + remaining

    bank = MemoryBank(cfg, CompactLayout.from_masks(cfg, masks), DOMAINS, table, lora_scale=2.0)
    names = ["fr", "en", "fr"]
    tokens, segments = batch(seed)
    got = compact_logits(model, tokens, segments, bank.rows(names))
    want = reference_logits(decoder, masks, table, bank.domain_ids(names), tokens, segments, 2.0)
    valid = np.asarray(segments) != 0
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-5, rtol=1e-5)


def test_rounding_keeps_next_best_units_and_stays_exact():
    cfg = tiny("llama")
    decoder = random_decoder(cfg)
    masks = hard_masks(cfg)
    scores = {"head": np.random.default_rng(3).random((cfg.num_layers, cfg.num_heads)),
              "neuron": np.random.default_rng(4).random((cfg.num_layers, cfg.d_ff))}
    rounded = round_masks(cfg, masks, scores, 32)
    kept = rounded["neuron"].sum(1)
    assert np.all(kept % 32 == 0) and np.all(kept >= masks["neuron"].sum(1))
    assert np.all(rounded["head"].sum(1) % 2 == 0)  # 32 features = 2 heads of 16
    assert np.all(rounded["neuron"] >= masks["neuron"]) and np.all(rounded["head"] >= masks["head"])
    for layer in range(cfg.num_layers):  # every added neuron outscores every still-dropped one
        added = (rounded["neuron"][layer] > masks["neuron"][layer])
        dropped = rounded["neuron"][layer] == 0
        if added.any() and dropped.any():
            assert scores["neuron"][layer][added].min() > scores["neuron"][layer][dropped].max()
    layout = CompactLayout.from_masks(cfg, rounded)
    model = compact_decoder(decoder, layout)
    assert prunable_params(model) == int(sparsity.remaining_params(cfg, rounded))
    tokens, segments = batch()
    table = random_table(cfg)
    bank = MemoryBank(cfg, layout, DOMAINS, table, lora_scale=1.0)
    got = compact_logits(model, tokens, segments, bank.rows(["en"] * 3))
    want = reference_logits(decoder, rounded, table, bank.domain_ids(["en"] * 3), tokens, segments, 1.0)
    valid = np.asarray(segments) != 0
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-5, rtol=1e-5)


def test_layout_round_trips_through_json():
    cfg = tiny("qwen3")
    layout = CompactLayout.from_masks(cfg, hard_masks(cfg))
    assert CompactLayout.from_json(layout.to_json()) == layout
    np.testing.assert_array_equal(layout.masks(cfg)["head"], hard_masks(cfg)["head"])
