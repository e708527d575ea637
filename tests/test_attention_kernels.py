"""Attention kernels: the fused call equals `attend` on every mask the decoder builds; `attention_impl` routes it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsemem.models import forward, layers
from sparsemem.models.config import preset
from sparsemem.models.decoder import Decoder, KVCache
from sparsemem.models.hooks import Hooks

TINY_GEMMA = preset("gemma-3-270m").replace(
    num_layers=3, d_model=64, d_ff=96, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=160, sliding_window=5)
TINY_LLAMA = preset("llama-3.2-1b").replace(
    num_layers=2, d_model=64, d_ff=96, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=160)
B, T, M = 2, 12, 3
PACKED = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3, [0] * 2 + [1] * 10], jnp.int32)  # two documents; padding


def prologue_inputs(kind: str) -> forward.Inputs:
    """What `forward.prologue` computes for one kind of batch."""
    cfg = TINY_GEMMA if kind.startswith("window") else TINY_LLAMA
    embed = jnp.zeros((cfg.vocab_size, cfg.d_model))
    tokens = jnp.ones((B, 1 if kind == "decode" else T), jnp.int32)
    kwargs = dict(dtype=jnp.float32, positions=None, segment_ids=None, cache=None)
    if kind != "causal":
        kwargs.update(memory_slots=M, first_position=M)
    if kind.endswith("packed"):
        kwargs.update(segment_ids=PACKED)
    if kind == "decode":  # one new token against a KV cache of 16 slots, 9 filled (row 0 left-padded)
        filled = jnp.zeros((B, 16), jnp.int32).at[:, :9].set(1).at[0, :2].set(0)
        kwargs.update(cache=KVCache(k=None, v=None, segment_ids=filled, next_position=jnp.asarray([7, 9]),
                                    index=jnp.asarray(9)))
    return forward.prologue(cfg, embed, tokens, **kwargs)[1]


def masks(kind: str) -> list[jax.Array]:
    """The masks of one kind of batch: global, and local where the model has sliding windows."""
    inputs = prologue_inputs(kind)
    return [m for m in (inputs.global_mask, inputs.local_mask) if m is not None]


def random_qkv(t: int, s: int, dtype=jnp.float32) -> list[jax.Array]:
    """Queries `[B, t, 4, 16]`, keys and values `[B, s, 2, 16]`: grouped-query heads."""
    return [jax.random.normal(jax.random.key(i), (B, n, heads, 16), dtype)
            for i, (n, heads) in enumerate([(t, 4), (s, 2), (s, 2)])]


@pytest.mark.parametrize("kind", ["causal", "memory", "packed", "window", "window_packed", "decode"])
def test_fused_call_equals_attend_on_every_mask(kind):
    """Memory before causal text, packed documents with padding, Gemma windows, a KV cache; 4 query heads on 2 KV."""
    for mask in masks(kind):
        q, k, v = random_qkv(*mask.shape[1:])
        assert not bool(mask.all())  # every kind hides something
        want = layers.attend(q, k, v, mask, 0.25)
        got = layers.fused_attend(q, k, v, mask, 0.25, "xla")
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)


def test_fused_call_in_bfloat16_tracks_attend():
    mask = masks("window")[1]
    q, k, v = random_qkv(T, T + M, jnp.bfloat16)
    want = layers.attend(q, k, v, mask, 0.25).astype(jnp.float32)
    np.testing.assert_allclose(layers.fused_attend(q, k, v, mask, 0.25, "xla").astype(jnp.float32), want,
                               atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kind", ["causal", "memory", "packed", "window", "decode"])
def test_causal_call_equals_attend_where_the_global_mask_is_causal(kind):
    """Only one unpadded document without a cache flags its global mask causal; there the kernel's own causal
    mask (queries padded in front over the memory slots) equals `attend` with the mask."""
    inputs = prologue_inputs(kind)
    assert inputs.global_causal == (kind in ("causal", "memory", "window"))
    if inputs.global_causal:
        q, k, v = random_qkv(*inputs.global_mask.shape[1:])
        want = layers.attend(q, k, v, inputs.global_mask, 0.25)
        np.testing.assert_allclose(layers.fused_causal_attend(q, k, v, 0.25, "xla"), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("requested, dtype, platform, cached, kernel", [
    ("auto", jnp.bfloat16, "cuda", False, "cudnn"), ("auto", jnp.float16, "cuda", False, "cudnn"),
    ("auto", jnp.bfloat16, "cuda", True, "xla"), ("auto", jnp.float32, "cuda", False, "xla"),
    ("auto", jnp.bfloat16, "rocm", False, "xla"), ("auto", jnp.bfloat16, "tpu", False, "xla"),
    ("auto", jnp.bfloat16, "cpu", False, "xla"), ("xla", jnp.bfloat16, "cuda", False, "xla"),
    ("cudnn", jnp.float32, "cpu", True, "cudnn")])
def test_attention_kernel_choice(requested, dtype, platform, cached, kernel):
    assert layers.attention_kernel(requested, dtype, platform, cached) == kernel


def test_unknown_attention_impl_is_refused():
    with pytest.raises(ValueError, match="attention_impl='splash' must be one of auto, xla, cudnn"):
        TINY_LLAMA.replace(attention_impl="splash")


def test_decoder_with_cudnn_makes_the_fused_call_and_equals_the_default(monkeypatch):
    """`attention_impl="cudnn"` sends every layer through `jax.nn.dot_product_attention` (run here by its XLA
    reference): memory slots, packed documents and Gemma windows in training, then decoding against a KV cache."""
    calls = []
    reference = jax.nn.dot_product_attention

    def xla_instead(*args, implementation, **kwargs):
        calls.append((implementation, kwargs.get("is_causal", False)))
        return reference(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", xla_instead)
    default = Decoder(TINY_GEMMA, rngs=nnx.Rngs(0))
    fused = Decoder(TINY_GEMMA.replace(attention_impl="cudnn"), rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 160, (B, T)), jnp.int32)
    memory = jax.random.normal(jax.random.key(1), (2, B, TINY_GEMMA.num_layers, M, 2, 16))
    hooks = Hooks(memory_k=memory[0], memory_v=memory[1])
    positions = M + forward.layers.segment_positions(PACKED)

    @nnx.jit
    def train_forward(model):
        return model(tokens, positions=positions, segment_ids=PACKED, hooks=hooks)[0]

    @nnx.jit
    def decode(model):
        _, cache = model(tokens[:, :-1], cache=model.init_cache(B, T))
        return model(tokens[:, -1:], cache=cache)[0]

    valid = np.asarray(PACKED != 0)
    np.testing.assert_allclose(np.asarray(train_forward(fused))[valid], np.asarray(train_forward(default))[valid],
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(decode(fused), decode(default), atol=1e-5, rtol=1e-5)
    assert calls and set(calls) == {("cudnn", False)}  # packed documents, a cache, traced window choice: the mask


def test_decoder_with_cudnn_uses_the_causal_kernel_for_one_document(monkeypatch):
    """Llama on one unpadded document with memory slots: the kernel's causal mask, no mask read; same states."""
    calls = []
    reference = jax.nn.dot_product_attention

    def xla_instead(*args, implementation, **kwargs):
        calls.append((implementation, kwargs.get("is_causal", False), kwargs.get("mask") is None))
        return reference(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", xla_instead)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 160, (B, T)), jnp.int32)
    memory = jax.random.normal(jax.random.key(1), (2, B, TINY_LLAMA.num_layers, M, 2, 16))
    hooks = Hooks(memory_k=memory[0], memory_v=memory[1])
    run = nnx.jit(lambda model: model(tokens, hooks=hooks)[0])
    want = run(Decoder(TINY_LLAMA, rngs=nnx.Rngs(0)))
    got = run(Decoder(TINY_LLAMA.replace(attention_impl="cudnn"), rngs=nnx.Rngs(0)))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert calls and set(calls) == {("cudnn", True, True)}
