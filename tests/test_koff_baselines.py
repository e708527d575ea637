"""Baseline masks: dense, random and Taylor-score masks hit the target sparsity; scores are exact gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsemem.koff import baselines, sparsity
from sparsemem.koff.config import KoffConfig
from sparsemem.models.config import preset
from sparsemem.models.decoder import Decoder
from sparsemem.models.hooks import Hooks
from sparsemem.models.loss import token_cross_entropy
from sparsemem.train.trainer import KoffTrainer

CFG = preset("gemma-3-270m").replace(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                                     vocab_size=300)


def realised(masks):
    return float(sparsity.sparsity(CFG, sparsity.remaining_params(CFG, masks)))


def one_unit():
    counts = sparsity.ParamCounts.of(CFG)
    return (counts.head + counts.kv_head) / counts.prunable  # the costliest single removal


@pytest.mark.parametrize("target", [0.06, 0.12, 0.25, 0.5])
def test_random_masks_hit_the_target_and_depend_on_the_seed(target):
    a, b = baselines.random_mask(CFG, target, seed=0), baselines.random_mask(CFG, target, seed=1)
    assert abs(realised(a) - target) <= one_unit() and abs(realised(b) - target) <= one_unit()
    assert not np.array_equal(a["neuron"], b["neuron"])
    assert set(np.unique(a["head"])) <= {0.0, 1.0} and a["neuron"].shape == (CFG.num_layers, CFG.d_ff)
    assert realised(baselines.dense_mask(CFG)) == 0.0


def test_score_masks_remove_the_lowest_scores_first():
    rng = np.random.default_rng(0)
    scores = {"head": rng.random((CFG.num_layers, CFG.num_heads)), "neuron": rng.random((CFG.num_layers, CFG.d_ff))}
    masks = baselines.masks_from_scores(CFG, scores, 0.25)
    assert abs(realised(masks) - 0.25) <= one_unit()
    for unit in ("head", "neuron"):  # ranked within each type (KOFF's rule allocates the budget between types)
        kept = masks[unit] > 0
        assert scores[unit][~kept].max() < scores[unit][kept].min()
    with pytest.raises(ValueError, match="finite"):
        baselines.masks_from_scores(CFG, {"head": scores["head"] * np.nan, "neuron": scores["neuron"]}, 0.1)


def test_taylor_scores_are_the_mean_absolute_gate_gradients():
    decoder = Decoder(CFG, rngs=nnx.Rngs(0))
    trainer = KoffTrainer(decoder, KoffConfig(num_domains=1, memory_slots=0, lora_rank=0, lora_targets=()))
    rng = np.random.default_rng(0)
    b, t = 4, 12
    batches = [{"inputs": rng.integers(3, 300, (b, t)), "targets": rng.integers(3, 300, (b, t)),
                "loss_mask": np.ones((b, t), np.float32), "segment_ids": np.ones((b, t), np.int32),
                "positions": np.tile(np.arange(t), (b, 1)), "domain": np.zeros(b, np.int32)} for _ in range(2)]

    def reference_grad(batch):
        def loss(scales):
            hidden, _ = decoder(jnp.asarray(batch["inputs"]), hooks=Hooks(head_scale=scales[0], neuron_scale=scales[1]))
            return jnp.mean(token_cross_entropy(decoder, hidden, jnp.asarray(batch["targets"])))
        return jax.grad(loss)((jnp.ones((2, 4)), jnp.ones((2, 64))))

    grads = [reference_grad(batch) for batch in batches]
    got = baselines.taylor_scores(trainer, batches)
    np.testing.assert_allclose(got["head"], np.mean([np.abs(g[0]) for g in grads], 0), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(got["neuron"], np.mean([np.abs(g[1]) for g in grads], 0), rtol=1e-4, atol=1e-9)
    masks = baselines.masks_from_scores(CFG, got, 0.12)
    assert abs(realised(masks) - 0.12) <= one_unit()
    with pytest.raises(ValueError, match="at least one calibration batch"):
        baselines.taylor_scores(trainer, [])
