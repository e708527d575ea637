"""LAPE: entropy, language-specific neurons, permutation test, activation statistics vs cut decoders."""

import numpy as np
import pytest
from flax import nnx

from sparsemem.analysis import lape
from sparsemem.evaluation import bootstrap
from sparsemem.models.decoder import Decoder
from sparsemem.models.hooks import Hooks

from test_decoder import TINY_GEMMA, TINY_LLAMA, random_model


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


def _cut(decoder: Decoder, depth: int) -> Decoder:
    """The first `depth` layers of `decoder`, with layer depth-1's MLP norm as the final norm."""
    cfg = decoder.cfg.replace(num_layers=depth, layer_types=decoder.cfg.layer_types[:depth])
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), dtype=decoder.dtype)))
    full = nnx.to_pure_dict(nnx.state(decoder, nnx.Param))
    pure = {"embed": full["embed"], "layers": {k: v[:depth] for k, v in full["layers"].items()},
            "final_norm": full["layers"]["mlp_norm"][depth - 1]}
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _reference_counts(decoder: Decoder, batches: list[dict], num_domains: int) -> tuple[np.ndarray, np.ndarray]:
    """Per domain, active-token counts `[D, L, F]` and real tokens `[D]`, layer by layer.

    Layer l's MLP input is read from a decoder cut after layer l whose last MLP is switched
    off (`neuron_scale` 0) and whose final norm is layer l's MLP norm: exactly the normed input.
    """
    L, F = decoder.cfg.num_layers, decoder.cfg.d_ff
    counts, tokens = np.zeros((num_domains, L, F), np.int64), np.zeros(num_domains, np.int64)
    for layer in range(L):
        cut = _cut(decoder, layer + 1)
        off = np.ones((layer + 1, F), np.float32)
        off[-1] = 0.0
        w_gate = np.asarray(decoder.layers.w_gate[layer])
        for batch in batches:
            hidden, _ = cut(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                            hooks=Hooks(neuron_scale=off))
            active = (np.einsum("btd,df->btf", np.asarray(hidden), w_gate) > 0) & (batch["segment_ids"] > 0)[..., None]
            np.add.at(counts[:, layer], batch["domain"], active.sum(1))
    for batch in batches:
        np.add.at(tokens, batch["domain"], (batch["segment_ids"] > 0).sum(1))
    return counts, tokens


def _packed_batch(rng: np.random.Generator, vocab: int, domains: list[int]) -> dict:
    """Rows of 12 tokens: packed documents (positions restart per segment), padding (segment 0)."""
    layouts = [[1] * 5 + [2] * 4 + [3] * 3, [1] * 7 + [0] * 5, [1] * 12, [0] * 12, [1] * 3 + [2] * 6 + [0] * 3]
    segment_ids = np.array([layouts[i % len(layouts)] for i in range(len(domains))], np.int32)
    positions = np.zeros_like(segment_ids)
    for row in range(len(domains)):
        for t in range(1, 12):
            same = segment_ids[row, t] == segment_ids[row, t - 1]
            positions[row, t] = positions[row, t - 1] + 1 if same else 0
    return {"inputs": rng.integers(3, vocab, segment_ids.shape), "positions": positions,
            "segment_ids": segment_ids, "domain": np.array(domains)}


@pytest.mark.parametrize("cfg", [TINY_GEMMA.replace(layer_types=("local", "global", "local")), TINY_LLAMA],
                         ids=["gemma3", "llama"])
def test_activation_probabilities_equal_the_cut_decoder_reference(cfg):
    decoder = random_model(cfg, seed=3)
    rng = np.random.default_rng(0)
    batches = [_packed_batch(rng, cfg.vocab_size, [0, 1, 2, 1, 0]), _packed_batch(rng, cfg.vocab_size, [2, 2, 0, 1, 1])]
    probs, tokens = lape.activation_probabilities(decoder, batches, 3)
    want_counts, want_tokens = _reference_counts(decoder, batches, 3)
    # real tokens per domain, by hand from the layouts: 12 + 9 + 12 (domain 0), 7 + 0 + 0 + 9 (1), 12 + 12 + 7 (2)
    np.testing.assert_array_equal(want_tokens, [33, 16, 31])
    np.testing.assert_array_equal(tokens, want_tokens)
    np.testing.assert_allclose(probs, want_counts / want_tokens[:, None, None], rtol=0, atol=1e-6)
    assert probs.shape == (3, cfg.num_layers, cfg.d_ff) and 0.05 < probs.mean() < 0.95


def test_activation_probabilities_reject_a_domain_without_tokens():
    decoder = random_model(TINY_LLAMA)
    batch = _packed_batch(np.random.default_rng(0), TINY_LLAMA.vocab_size, [0, 1, 0, 2])  # domain 2: a padding row
    with pytest.raises(ValueError, match=r"domain\(s\) \[2\]"):
        lape.activation_probabilities(decoder, [batch], 3)
