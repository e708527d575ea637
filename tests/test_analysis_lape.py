"""LAPE: entropy, language-specific neurons, permutation test, exact MLP inputs from cut decoders."""

import numpy as np
import pytest
from flax import nnx

from sparsemem.analysis import lape
from sparsemem.evaluation import bootstrap
from sparsemem.models.config import preset
from sparsemem.models.decoder import Decoder


def test_entropy_is_zero_for_one_language_and_log_d_for_all():
    probs = np.zeros((4, 1, 3))
    probs[2, 0, 0] = 0.7
    probs[:, 0, 1] = 0.3
    entropy = lape.lape(probs)
    np.testing.assert_allclose(entropy[0], [0.0, np.log(4), np.log(4)], atol=1e-12)  # silent: uniform


def test_specific_neurons_are_the_low_entropy_active_ones():
    rng = np.random.default_rng(0)
    probs = rng.uniform(0.4, 0.6, (3, 2, 50))
    probs[1, 0, 7] = 0.9
    probs[[0, 2], 0, 7] = 0.01  # specific and active
    probs[0, 1, 3] = 1e-3
    probs[[1, 2], 1, 3] = 0.0  # specific but silent: not a candidate
    specific = lape.specific_neurons(probs, fraction=0.01, min_activation_quantile=0.5)
    assert specific.sum() == 1 and specific[0, 7]


def test_removal_test_detects_preferential_removal_and_chance():
    specific = np.zeros((4, 100), bool)
    specific[:, :10] = True
    removed = np.zeros((4, 100), bool)
    removed[:, :10] = True  # all specific ones removed, plus 10 others per layer
    removed[:, 50:60] = True
    out = lape.removal_test(specific, removed, permutations=200)
    assert out["removed_among_chosen"] == 1.0 and out["removed_among_all"] == 0.2
    assert abs(out["chance_mean"] - 0.2) < 0.03 and out["p_removed"] < 0.01 and out["p_kept"] == 1.0
    assert out["effect"]["estimate"] == pytest.approx(0.8, abs=0.02) and out["effect"]["low"] > 0.5
    kept = lape.removal_test(specific, np.roll(removed, 25, axis=1), permutations=200)
    assert kept["removed_among_chosen"] == 0.0 and kept["p_removed"] == 1.0 and kept["p_kept"] < 0.01
    assert kept["effect"]["high"] < 0  # preferentially kept: the interval is below chance


def test_removal_effect_is_inconclusive_when_the_mask_ignores_the_neurons():
    rng = np.random.default_rng(0)
    chosen = rng.random((6, 400)) < 0.05
    verdicts = []
    for seed in range(10):
        removed = np.random.default_rng(seed).random((6, 400)) < 0.2
        effect = lape.removal_test(chosen, removed, permutations=200, seed=seed)["effect"]
        verdicts.append(bootstrap.Interval(**effect).verdict(0.0, ">"))
    assert verdicts.count(bootstrap.INCONCLUSIVE) >= 8


def test_a_small_set_none_of_which_is_removed_is_not_called_kept():
    chosen = np.zeros((2, 100), bool)
    chosen[:, :3] = True  # 6 neurons, none removed; 20% of all removed: P(0 of 6) = 0.26 under chance
    removed = np.zeros((2, 100), bool)
    removed[:, 50:70] = True
    out = lape.removal_test(chosen, removed, permutations=500)
    assert out["p_kept"] > 0.05
    assert bootstrap.Interval(**out["effect"]).verdict(0.0, "<") == bootstrap.INCONCLUSIVE


def test_general_neurons_are_the_high_entropy_active_ones():
    probs = np.full((3, 1, 10), 0.5)
    probs[:, 0, :5] = [[0.9], [0.01], [0.01]]  # specific
    probs[:, 0, 9] = 0.0  # silent
    general = lape.general_neurons(probs, fraction=0.3, min_activation_quantile=0.2)
    assert general[0].tolist() == [False] * 5 + [True] * 3 + [False] * 2


def test_cut_decoder_reproduces_the_full_model_and_switches_the_last_mlp_off():
    from sparsemem.models.hooks import Hooks

    cfg = preset("gemma-3-270m").replace(num_layers=3, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                                         d_ff=64, vocab_size=300)
    decoder = Decoder(cfg, rngs=nnx.Rngs(1))
    tokens = np.random.default_rng(0).integers(3, 300, (2, 10))
    full, _ = decoder(tokens)
    cut = lape._cut(decoder, 3)
    cut.final_norm[...] = decoder.final_norm[...]
    np.testing.assert_allclose(cut(tokens)[0], full, rtol=1e-5, atol=1e-5)
    # neuron_scale 0 on the last layer == that layer's down projection zeroed.
    off = np.ones((3, 64), np.float32)
    off[-1] = 0
    hooked, _ = cut(tokens, hooks=Hooks(neuron_scale=off))
    cut.layers.w_down[...] = cut.layers.w_down[...].at[-1].set(0.0)
    np.testing.assert_allclose(hooked, cut(tokens)[0], rtol=1e-5, atol=1e-6)


def test_activation_probabilities_shape_and_range():
    cfg = preset("gemma-3-270m").replace(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                                         d_ff=64, vocab_size=300)
    decoder = Decoder(cfg, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(3, 300, (4, 8)), "positions": np.tile(np.arange(8), (4, 1)),
             "segment_ids": np.ones((4, 8), np.int32), "domain": np.array([0, 1, 0, 1])}
    batch["segment_ids"][3] = 0  # a padding row counts for nothing
    probs, tokens = lape.activation_probabilities(decoder, [batch], 2)
    np.testing.assert_array_equal(tokens, [16, 8])
    assert probs.shape == (2, 2, 64)
    assert np.all((probs >= 0) & (probs <= 1)) and 0.05 < probs.mean() < 0.95
    # domain 1 has one real row of 8 tokens: probabilities are multiples of 1/8
    np.testing.assert_allclose(probs[1] * 8, np.round(probs[1] * 8), atol=1e-9)
