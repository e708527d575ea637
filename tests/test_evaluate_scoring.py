"""Scorer: dense losses match the model's own, masks and memories change them as the settings say."""

import numpy as np
import pytest
from flax import nnx

from sparsemem.evaluation import settings as settings_lib
from sparsemem.evaluation.scoring import Scorer, domain_losses
from sparsemem.koff.config import KoffConfig
from sparsemem.models.config import preset
from sparsemem.models.decoder import Decoder
from sparsemem.models.loss import token_cross_entropy
from sparsemem.train.trainer import KoffTrainer

CFG = preset("gemma-3-270m").replace(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                                     vocab_size=300)


@pytest.fixture(scope="module")
def setup():
    decoder = Decoder(CFG, rngs=nnx.Rngs(0))
    trainer = KoffTrainer(decoder, KoffConfig(num_domains=3, memory_slots=2, lora_rank=2, memory_init="random",
                                              memory_init_std=1.0))
    state = trainer.init()
    rng = np.random.default_rng(0)
    memory = {k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in state.memory.items()}  # non-trivial b
    b, t = 6, 12
    batch = {"inputs": rng.integers(3, 300, (b, t)), "targets": rng.integers(3, 300, (b, t)),
             "loss_mask": np.ones((b, t), np.float32), "segment_ids": np.ones((b, t), np.int32),
             "positions": np.tile(np.arange(t), (b, 1)), "domain": np.array([0, 1, 2, 0, 1, 2])}
    batch["loss_mask"][0, :5] = 0
    return decoder, Scorer(trainer), memory, batch


def test_dense_losses_equal_the_decoders_own(setup):
    decoder, scorer, _, batch = setup
    loss, tokens = scorer.row_losses(batch)
    hidden, _ = decoder(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    expected = (np.asarray(token_cross_entropy(decoder, hidden, batch["targets"])) * batch["loss_mask"]).sum(1)
    np.testing.assert_allclose(loss, expected, rtol=1e-4)
    np.testing.assert_array_equal(tokens, batch["loss_mask"].sum(1))


def test_mask_and_memory_change_losses_and_swap_picks_the_row(setup):
    _, scorer, memory, batch = setup
    dense, _ = scorer.row_losses(batch)
    masks = {"head": np.ones((2, 4), np.float32), "neuron": np.ones((2, 64), np.float32)}
    np.testing.assert_allclose(scorer.row_losses(batch, masks=masks)[0], dense, rtol=1e-5)  # all kept = dense
    masks["neuron"][:, :32] = 0
    assert not np.allclose(scorer.row_losses(batch, masks=masks)[0], dense, rtol=1e-3)
    own, _ = scorer.row_losses(batch, memory=memory, lora_scale=2.0)
    assert not np.allclose(own, dense, rtol=1e-3)
    # Memory of domain 1 for every row: rows of domain 1 unchanged, the others differ.
    swapped, _ = scorer.row_losses(batch, memory=memory, memory_index=np.full(6, 1), lora_scale=2.0)
    is_one = batch["domain"] == 1
    np.testing.assert_allclose(swapped[is_one], own[is_one], rtol=1e-5)
    assert not np.allclose(swapped[~is_one], own[~is_one], rtol=1e-3)
    # Only the KV part of the memory: differs from both the full memory and no memory.
    kv, _ = scorer.row_losses(batch, memory=settings_lib.memory_parts(memory, ("kv",)), lora_scale=2.0)
    assert not np.allclose(kv, own, rtol=1e-3) and not np.allclose(kv, dense, rtol=1e-3)


def test_domain_losses_sum_rows_by_domain(setup):
    _, scorer, _, batch = setup
    rows, tokens = scorer.row_losses(batch)
    loss, count = domain_losses(scorer, [batch, batch], 3)
    np.testing.assert_allclose(loss, 2 * np.bincount(batch["domain"], rows, 3), rtol=1e-6)
    np.testing.assert_allclose(count, 2 * np.bincount(batch["domain"], tokens, 3))


def test_settings_use_retrained_ablations_when_trained():
    jointly = settings_lib.resolve(("koff",))
    assert "pruned_retrained" not in jointly
    assert jointly["pruned_lora"].memory == "koff" and jointly["pruned_lora"].parts == ("lora",)
    alone = settings_lib.resolve(("koff", "prune_only", "lora_only", "kv_only"))
    assert list(alone) == list(settings_lib.SETTINGS)
    assert alone["pruned_kv"].mask == "kv_only" and alone["pruned_kv"].memory == "kv_only"
    assert alone["pruned_retrained"].memory is None
    table = {"k": 1, "v": 2, "q_a": 3, "q_b": 4}
    assert settings_lib.memory_parts(table, ("lora",)) == {"q_a": 3, "q_b": 4}
