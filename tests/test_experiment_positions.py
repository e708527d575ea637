"""Text follows the memory: with positions shifted past the slots, prefill memory acts exactly like a prefix.

The trainer shifts its own batches; scoring callers shift with `after_memory`.
"""

import numpy as np
import pytest
from flax import nnx

from sparsemem.evaluation.scoring import Scorer
from sparsemem.koff.config import KoffConfig
from sparsemem.models.config import preset
from sparsemem.models.decoder import Decoder
from sparsemem.train.trainer import KoffTrainer, after_memory

CFG = preset("gemma-3-270m").replace(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                                     vocab_size=300)
M, T = 6, 10


def _batch(tokens, first_position=0):
    b, t = tokens.shape
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((b, t - 1), np.float32),
            "segment_ids": np.ones((b, t - 1), np.int32),
            "positions": np.tile(first_position + np.arange(t - 1), (b, 1)), "domain": np.arange(b, dtype=np.int32)}


@pytest.fixture(scope="module")
def setup():
    decoder = Decoder(CFG, rngs=nnx.Rngs(0))
    prefix = np.random.default_rng(1).integers(3, 300, (2, M))
    trainer = KoffTrainer(decoder, KoffConfig(num_domains=2, memory_slots=M, lora_rank=0, lora_targets=()))
    state = trainer.init(prefix)  # memory = the model's own keys/values over `prefix`, positions 0..M-1
    return Scorer.for_trainer(trainer), prefix, state.memory, trainer, state


def test_shift_changes_nothing_without_memory(setup):
    scorer, *_ = setup
    text = np.random.default_rng(2).integers(3, 300, (2, T))
    plain, _ = scorer.row_losses(_batch(text))
    shifted, _ = scorer.row_losses(after_memory(_batch(text), M))
    np.testing.assert_allclose(shifted, plain, rtol=1e-4)


def test_prefill_memory_after_shift_equals_the_prefix_in_context(setup):
    scorer, prefix, memory, _, _ = setup
    text = np.random.default_rng(3).integers(3, 300, (2, T))
    with_memory, _ = scorer.row_losses(after_memory(_batch(text), M), memory=memory)
    in_context = _in_context(scorer, prefix, text)
    np.testing.assert_allclose(with_memory, in_context, rtol=1e-4)
    unshifted, _ = scorer.row_losses(_batch(text), memory=memory)
    # Unshifted, memory keys lie in the text's future: not the prefix (far beyond the shifted run's rounding).
    assert np.abs(unshifted - in_context).max() > 20 * np.abs(with_memory - in_context).max()


def _in_context(scorer, prefix, text):
    """Row losses with the prefix as real context; loss only on the text's own next-token targets."""
    joined = _batch(np.concatenate([prefix, text], axis=1))
    joined["loss_mask"][:, :M] = 0
    return scorer.row_losses(joined)[0]


def test_the_trainer_places_text_after_the_memory_itself(setup):
    scorer, prefix, _, trainer, state = setup
    text = np.random.default_rng(4).integers(3, 300, (2, T))
    # An unshifted batch (positions from 0), as any caller of KoffTrainer passes it; no pruning at target 0.
    losses = trainer.evaluate(state, [_batch(text)], target=0.0)["loss_memory"]
    np.testing.assert_allclose(losses, _in_context(scorer, prefix, text) / (T - 1), rtol=1e-4)
