"""The gate regime's levers: the importance start, frozen gates, prune-then-memory in one budget, gate samples."""

import jax
import numpy as np
import pytest
from flax import nnx

from sparsemem.koff import baselines, sparsity
from sparsemem.koff.config import KoffConfig
from sparsemem.koff.importance import importance_log_alphas, unit_ranks
from sparsemem.models.config import preset
from sparsemem.models.decoder import Decoder
from sparsemem.models.hooks import Hooks
from sparsemem.train import KoffTrainer

CFG = preset("gemma-3-270m").replace(num_layers=2, d_model=64, d_ff=128, num_heads=4, num_kv_heads=2, head_dim=16,
                                     vocab_size=256, sliding_window=8)
KCFG = KoffConfig(num_domains=2, memory_slots=2, lora_targets=("q", "down"), target_sparsity=0.25, total_steps=6,
                  warmup_fraction=0.5, memory_lr=1e-2, gate_lr=0.5, memory_init="random")
B, T = 4, 12


def batch(seed):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, CFG.vocab_size, (B, T + 1))
    return dict(inputs=toks[:, :-1], targets=toks[:, 1:], loss_mask=np.ones((B, T), np.float32),
                segment_ids=np.ones((B, T), int), positions=np.tile(np.arange(T), (B, 1)), domain=np.array([0, 1] * 2))


def random_scores(seed, ties=True):
    rng = np.random.default_rng(seed)
    scores = {"head": rng.random((CFG.num_layers, CFG.num_heads)), "neuron": rng.random((CFG.num_layers, CFG.d_ff))}
    if ties:  # dead units score exactly 0: ties are broken by index, as the score mask breaks them
        scores["neuron"][:, ::7] = 0.0
    return scores


@pytest.fixture(scope="module")
def decoder():
    return Decoder(CFG, rngs=nnx.Rngs(0))


def host(tree):
    return jax.tree.map(np.array, jax.device_get(tree))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("target", [0.06, 0.25, 0.5])
def test_the_importance_starts_deterministic_mask_is_the_score_mask(seed, target):
    scores = random_scores(seed)
    kcfg = KCFG.replace(gate_init="importance", target_sparsity=target)
    start = importance_log_alphas(CFG, kcfg, scores)
    masks = jax.device_get(sparsity.deterministic_masks(CFG, start, target))
    expected = baselines.masks_from_scores(CFG, scores, target)
    for name in expected:
        np.testing.assert_array_equal(masks[name], expected[name])
    for name, la in start.items():  # strictly ordered by score, centred on the uniform start, inside the clamp
        assert len(np.unique(la)) == la.size
        assert la.max() <= kcfg.log_alpha_clamp
        np.testing.assert_array_equal(np.argsort(la, axis=None, kind="stable"),
                                      np.argsort(unit_ranks(scores[name]), axis=None, kind="stable"))


def test_frozen_gates_train_memories_under_exactly_the_score_mask(decoder):
    scores = random_scores(7)
    kcfg = KCFG.replace(gate_init="importance", gate_lr=0.0)
    trainer = KoffTrainer(decoder, kcfg, unit_scores=scores)
    state = trainer.init()
    start = host(state.gates)
    memory_before = host(state.memory)
    for step in range(kcfg.total_steps):
        assert trainer.step_kind(step) == "memory"
        state, _ = trainer.train_step(state, batch(step))
    final = trainer.final_masks(state)
    expected = baselines.masks_from_scores(CFG, scores, kcfg.target_sparsity)
    for name in expected:
        np.testing.assert_array_equal(final[name], expected[name])  # unit for unit
    jax.tree.map(np.testing.assert_array_equal, host(state.gates), start)  # the gates never moved
    assert not np.array_equal(host(state.memory)["k"], memory_before["k"])  # the memories trained


def test_learning_moves_the_importance_start(decoder):
    scores = random_scores(3, ties=False)
    trainer = KoffTrainer(decoder, KCFG.replace(gate_init="importance"), unit_scores=scores)
    state = trainer.init()
    np.testing.assert_allclose(float(sparsity.expected_sparsity(CFG, state.gates)), trainer.start_sparsity, rtol=1e-6)
    for step in range(KCFG.total_steps):
        state, metrics = trainer.train_step(state, batch(step))
    assert abs(float(metrics["expected_sparsity"]) - KCFG.target_sparsity) < 0.01  # the controller keeps the target
    final = trainer.final_masks(state)
    assert final["neuron"].sum() < final["neuron"].size  # a real mask, learned from the start


def test_unit_scores_and_gate_init_must_agree(decoder):
    compile_only = KoffTrainer(decoder, KCFG.replace(gate_init="importance"))  # steps compile without scores
    with pytest.raises(ValueError, match="needs unit_scores"):
        compile_only.init()
    with pytest.raises(ValueError, match="takes no unit_scores"):
        KoffTrainer(decoder, KCFG, unit_scores=random_scores(0))
    with pytest.raises(ValueError, match="importance scores need arrays"):
        importance_log_alphas(CFG, KCFG, {"head": np.ones((2, 3)), "neuron": np.ones((2, 128))})


def test_prune_then_memory_splits_one_budget(decoder):
    kcfg = KCFG.replace(joint=False, gate_fraction=0.5)
    trainer = KoffTrainer(decoder, kcfg)
    state = trainer.init()
    memory_before = host(state.memory)
    kinds = [trainer.step_kind(step) for step in range(kcfg.total_steps)]
    assert kinds == ["train"] * 3 + ["memory"] * 3
    for step in range(3):
        state, _ = trainer.train_step(state, batch(step))
    jax.tree.map(np.testing.assert_array_equal, host(state.memory), memory_before)  # no memory while pruning
    assert int(np.sum(host(state.memory_opt.count))) == 0
    gates = host(state.gates)
    for step in range(3, 6):
        state, _ = trainer.train_step(state, batch(step))
    jax.tree.map(np.testing.assert_array_equal, host(state.gates), gates)  # then only the memories
    assert not np.array_equal(host(state.memory)["k"], memory_before["k"])


def test_joint_false_needs_steps_after_the_gates():
    with pytest.raises(ValueError, match="gate_fraction < 1"):
        KCFG.replace(joint=False)


def test_per_example_unit_scales_equal_running_each_example_alone(decoder):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, (3, T))
    head = rng.random((3, CFG.num_layers, CFG.num_heads)).astype(np.float32)
    neuron = rng.random((3, CFG.num_layers, CFG.d_ff)).astype(np.float32)
    together, _ = decoder(tokens, hooks=Hooks(head_scale=head, neuron_scale=neuron))
    for i in range(3):
        alone, _ = decoder(tokens[i:i + 1], hooks=Hooks(head_scale=head[i], neuron_scale=neuron[i]))
        np.testing.assert_allclose(np.asarray(together[i]), np.asarray(alone[0]), rtol=1e-5, atol=1e-5)


def test_gate_samples_give_each_example_its_own_mask(decoder):
    """Four copies of one text, each its own domain, no memories: under one gate sample per step their losses
    are equal; under `gate_samples=4` each copy sees its own mask and the losses differ."""
    text = {k: np.repeat(v[:1], B, axis=0) for k, v in batch(0).items()}
    text["domain"] = np.arange(B)
    for samples in (1, B):
        kcfg = KCFG.replace(num_domains=B, gate_samples=samples, memory_slots=0, lora_rank=0, lora_targets=(),
                            init_keep_prob=0.5)
        trainer = KoffTrainer(decoder, kcfg)
        _, metrics = trainer.train_step(trainer.init(), text)
        per_copy = np.asarray(metrics["loss_sum_by_domain"])
        assert np.all(np.isfinite(per_copy))
        assert (len(np.unique(per_copy)) == 1) == (samples == 1), (samples, per_copy)
