"""KOFF train/eval steps: row-sparse updates, frozen backbone, meshes, checkpoints, resume, faults."""

import os
import signal

import jax
import numpy as np
import pytest
from flax import nnx

from sparsemem.checkpoints.run_state import CheckpointLayoutError, RunCheckpointer
from sparsemem.koff.config import KoffConfig
from sparsemem.models.config import preset
from sparsemem.models.decoder import Decoder
from sparsemem.parallel import multihost
from sparsemem.parallel.mesh import make_mesh
from sparsemem.train import KoffTrainer
from sparsemem.train.loop import NonFiniteLossError, train

CFG = preset("gemma-3-270m").replace(num_layers=2, d_model=64, d_ff=128, num_heads=4, num_kv_heads=2, head_dim=16,
                                     vocab_size=256, sliding_window=8)
KCFG = KoffConfig(num_domains=4, memory_slots=4, lora_targets=("q", "v", "down"), target_sparsity=0.2,
                  total_steps=8, warmup_fraction=0.5, memory_lr=1e-2, memory_init="prefill")
B, T = 8, 16


def make_batch(seed, domains):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, CFG.vocab_size, (B, T + 1))
    segments = np.where(np.arange(T) < T - 3, 1, 0) * np.ones((B, 1), int)  # last 3 positions are padding
    return dict(inputs=toks[:, :-1], targets=toks[:, 1:], loss_mask=(segments > 0).astype(np.float32),
                segment_ids=segments, positions=np.tile(np.arange(T), (B, 1)), domain=np.asarray(domains))


BATCHES = [make_batch(i, d) for i, d in enumerate(
    [[0, 1, 0, 1, 0, 1, 0, 1], [2, 2, 3, 3, 0, 0, 1, 1], [3] * 8, [0, 1, 2, 3, 0, 1, 2, 3], [1] * 8, [0, 2] * 4])]
DOMAIN_TOKENS = np.random.default_rng(9).integers(0, CFG.vocab_size, (KCFG.num_domains, KCFG.memory_slots))


@pytest.fixture(scope="module")
def decoder():
    return Decoder(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def trainer(decoder):
    return KoffTrainer(decoder, KCFG)


def host(tree):
    return jax.tree.map(np.array, jax.device_get(tree))


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, host(a), host(b))


def test_row_sparse_updates_and_frozen_backbone(trainer, decoder):
    state = trainer.init(DOMAIN_TOKENS)
    before = host(state)
    backbone_before = host(trainer.backbone.params)
    for _ in range(3):
        state, metrics = trainer.train_step(state, BATCHES[0])  # domains {0, 1} only
        assert np.isfinite(float(metrics["loss"]))
    after = host(state)
    for name in after.memory:
        for table in (lambda s: s.memory, lambda s: s.memory_opt.mu, lambda s: s.memory_opt.nu):
            np.testing.assert_array_equal(table(after)[name][2:], table(before)[name][2:])
        assert not np.array_equal(after.memory[name][:2], before.memory[name][:2])  # A moves once B != 0
    np.testing.assert_array_equal(after.memory_opt.count, [3, 3, 0, 0])
    assert [f._cache_size() for f in trainer._compiled.values()] == [1]  # no retracing across steps
    assert not np.array_equal(after.gates["head"], before.gates["head"])
    assert_trees_equal(trainer.backbone.params, backbone_before)
    assert_trees_equal(nnx.state(decoder, nnx.Param), backbone_before)
    m = jax.device_get(metrics)
    np.testing.assert_array_equal(m["tokens_by_domain"], [4 * (T - 3), 4 * (T - 3), 0, 0])
    np.testing.assert_allclose(m["loss_sum_by_domain"].sum() / m["tokens_by_domain"].sum(), m["loss"], rtol=1e-6)


def test_kv_memory_is_initialised_from_the_models_own_cache(trainer, decoder):
    state = trainer.init(DOMAIN_TOKENS)
    _, cache = decoder(DOMAIN_TOKENS[:1], cache=decoder.init_cache(1, KCFG.memory_slots))
    np.testing.assert_allclose(state.memory["k"][0], np.moveaxis(cache.k[:, 0], 0, 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(state.memory["q_b"], 0.0)  # LoRA starts as a no-op
    with pytest.raises(ValueError, match="domain_tokens"):
        trainer.init()


def test_eval_memory_matters_and_unknown_domains_are_refused(trainer):
    state = trainer.init(DOMAIN_TOKENS)
    for batch in BATCHES[:4]:
        state, _ = trainer.train_step(state, batch)
    out = trainer.evaluate(state, BATCHES[:2], target=0.2)
    assert np.all(np.isfinite(out["loss_memory"])) and not np.allclose(out["loss_memory"], out["loss_no_memory"])
    np.testing.assert_allclose(out["ppl_memory"], np.exp(out["loss_memory"]), rtol=1e-6)
    realised = float(trainer.eval_step(state, BATCHES[0], target=0.2)["sparsity"])
    assert abs(realised - 0.2) < 0.01
    with pytest.raises(ValueError, match="unknown domain id 7"):
        trainer.train_step(state, make_batch(0, [7] * B))


def test_eval_steps_through_the_empty_batches_of_a_shorter_shard_and_they_count_nothing(trainer, monkeypatch):
    """A process whose shard has fewer batches pads with empty ones (multihost.padded_to_longest): it takes part
    in every step, and the padding adds no token and no loss."""
    state = trainer.init(DOMAIN_TOKENS)
    alone = trainer.evaluate(state, BATCHES[:2])
    monkeypatch.setattr(multihost, "allgather_json", lambda count: [count, count + 2])  # the other shard: 2 more
    steps = []
    eval_step = trainer.eval_step
    monkeypatch.setattr(trainer, "eval_step", lambda *args: steps.append(args[1]) or eval_step(*args))
    padded = trainer.evaluate(state, BATCHES[:2])
    assert len(steps) == 4 and all(not np.any(batch["loss_mask"]) for batch in steps[2:])
    jax.tree.map(np.testing.assert_array_equal, padded, alone)


def test_after_the_gate_steps_only_memory_trains_under_the_final_mask(decoder):
    trainer = KoffTrainer(decoder, KCFG.replace(gate_fraction=0.25))  # gates train for steps 0 and 1
    state = trainer.init(DOMAIN_TOKENS)
    for batch in BATCHES[:2]:
        gates = host(state.gates)
        state, _ = trainer.train_step(state, batch)
        assert not np.array_equal(gates["neuron"], host(state.gates)["neuron"])
    before = host(state)
    expected = trainer.evaluate(state, [BATCHES[2]])
    state, metrics = trainer.train_step(state, BATCHES[2])
    after = host(state)
    assert_trees_equal((before.gates, before.multipliers, before.gate_opt), (after.gates, after.multipliers,
                                                                               after.gate_opt))
    assert not np.allclose(before.memory["k"][3], after.memory["k"][3])  # domain 3 trained
    np.testing.assert_allclose(float(metrics["loss"]), expected["loss_memory"][3], rtol=1e-5)
    np.testing.assert_allclose(float(metrics["expected_sparsity"]), KCFG.target_sparsity, atol=0.05)
    assert float(metrics["target"]) == np.float32(KCFG.target_sparsity)


def test_a_fixed_mask_trains_only_memory_under_exactly_that_mask(decoder):
    rng = np.random.default_rng(3)
    mask = {"head": (rng.random((CFG.num_layers, CFG.num_heads)) < 0.7).astype(np.float32),
            "neuron": (rng.random((CFG.num_layers, CFG.d_ff)) < 0.7).astype(np.float32)}
    trainer = KoffTrainer(decoder, KCFG, fixed_mask=mask)  # step 0 would be a gate step without the mask
    state = trainer.init(DOMAIN_TOKENS)
    before = host(state)
    expected = trainer.evaluate(state, [BATCHES[2]])
    state, metrics = trainer.train_step(state, BATCHES[2])
    after = host(state)
    assert trainer.step_kind(0) == "memory"
    assert_trees_equal((before.gates, before.multipliers, before.gate_opt), (after.gates, after.multipliers,
                                                                               after.gate_opt))
    assert not np.allclose(before.memory["k"][3], after.memory["k"][3])
    np.testing.assert_allclose(float(metrics["loss"]), expected["loss_memory"][3], rtol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, trainer.final_masks(state), mask)
    complement = KoffTrainer(decoder, KCFG, fixed_mask={k: 1 - v for k, v in mask.items()})
    fresh = trainer.init(DOMAIN_TOKENS)  # the same gates score differently under the two masks: the mask is used
    assert not np.allclose(complement.evaluate(fresh, [BATCHES[2]])["loss_no_memory"][3],
                           trainer.evaluate(fresh, [BATCHES[2]])["loss_no_memory"][3])
    with pytest.raises(ValueError, match="only 0 and 1"):
        KoffTrainer(decoder, KCFG, fixed_mask={k: v * 0.5 for k, v in mask.items()})
    with pytest.raises(ValueError, match=r"fixed_mask\['neuron'\] has shape"):
        KoffTrainer(decoder, KCFG, fixed_mask={"head": mask["head"], "neuron": mask["neuron"][:, :5]})
    with pytest.raises(ValueError, match="expected exactly"):
        KoffTrainer(decoder, KCFG, fixed_mask={"head": mask["head"]})


def assert_same_updates(init, a, b, rtol=1e-3):
    """Per array, |update_a - update_b| <= rtol * |update_a| (L2 norms).

    Adam normalises each element's step, so an element whose gradient is at
    float32 noise level can step differently under another reduction order;
    whole-array update norms are the meaningful comparison.
    """
    def check(x0, x, y):
        x0, x, y = (np.asarray(v, np.float64) for v in (x0, x, y))
        assert np.linalg.norm(x - y) <= rtol * np.linalg.norm(x - x0) + 1e-7

    jax.tree.map(check, host(init), host(a), host(b))


def test_gradient_accumulation_equals_one_large_batch(trainer, decoder):
    accum = KoffTrainer(decoder, KCFG.replace(accum_steps=2))
    init = trainer.init(DOMAIN_TOKENS)
    s2, m2 = accum.train_step(trainer.init(DOMAIN_TOKENS), BATCHES[1])  # same layout: reuse the state
    init_host = host(init)
    s1, m1 = trainer.train_step(init, BATCHES[1])
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    assert_same_updates(init_host, s1, s2)


def run(trainer, state, start, stop, checkpointer=None):
    losses = []
    batches = iter(BATCHES[start:stop])
    state, status = train(trainer, state, batches, num_steps=stop, checkpointer=checkpointer,
                          data_state=lambda: {"next_batch": stop}, on_metrics=lambda s, m: losses.append(m["loss"]))
    assert status == "done"
    return state, losses


def test_resume_gives_identical_losses(trainer, tmp_path):
    _, straight = run(trainer, trainer.init(DOMAIN_TOKENS), 0, 6)
    checkpointer = RunCheckpointer(tmp_path)
    state, first = run(trainer, trainer.init(DOMAIN_TOKENS), 0, 3, checkpointer)
    del state  # "kill"
    restored, data_state = RunCheckpointer(tmp_path).restore(trainer.abstract_state)
    assert int(restored.step) == 3 and data_state == {"next_batch": 3}
    _, second = run(trainer, restored, data_state["next_batch"], 6)
    assert first + second == straight


def test_mesh_matches_one_device_and_restores_on_other_meshes(trainer, decoder, tmp_path):
    """(2,4) data x model mesh vs 1 device: same losses and updates to float32 reduction-order noise."""
    mesh_trainer = KoffTrainer(decoder, KCFG, make_mesh({"data": 2, "model": 4}))
    assert mesh_trainer.state_shardings.memory["k"].spec[0] == "data"  # the domain axis is sharded
    single, sharded = trainer.init(DOMAIN_TOKENS), mesh_trainer.init(DOMAIN_TOKENS)
    init = host(single)
    for batch in BATCHES[:2]:
        single, m1 = trainer.train_step(single, batch)
        sharded, m2 = mesh_trainer.train_step(sharded, batch)
        np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    assert_same_updates(init, single, sharded)

    RunCheckpointer(tmp_path).save(2, sharded)
    saved = host(sharded)
    other = KoffTrainer(decoder, KCFG, make_mesh({"data": 4, "model": 2}))
    on_4x2, _ = RunCheckpointer(tmp_path).restore(other.abstract_state)
    assert on_4x2.memory["k"].sharding.spec[0] == "data" and on_4x2.memory["k"].sharding.mesh.shape["data"] == 4
    assert_trees_equal(on_4x2, saved)
    on_one, _ = RunCheckpointer(tmp_path).restore(trainer.abstract_state)
    assert len(on_one.memory["k"].sharding.device_set) == 1
    assert_trees_equal(on_one, saved)
    _, m_one = trainer.train_step(on_one, BATCHES[2])
    _, m_mesh = mesh_trainer.train_step(sharded, BATCHES[2])
    np.testing.assert_allclose(float(m_one["loss"]), float(m_mesh["loss"]), rtol=1e-5)


def test_restore_refuses_a_different_table(decoder, tmp_path, trainer):
    RunCheckpointer(tmp_path).save(0, trainer.init(DOMAIN_TOKENS))
    bigger = KoffTrainer(decoder, KCFG.replace(num_domains=5))
    with pytest.raises(ValueError, match="does not match"):
        RunCheckpointer(tmp_path).restore(bigger.abstract_state)
    with pytest.raises(FileNotFoundError):
        RunCheckpointer(tmp_path / "empty").restore(trainer.abstract_state)


def test_restore_part_reads_the_gates_alone_and_refuses_another_layout(tmp_path, trainer):
    state = trainer.init(DOMAIN_TOKENS)
    RunCheckpointer(tmp_path).save(0, state)
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainer.abstract_state.gates)
    assert_trees_equal(RunCheckpointer(tmp_path).restore_part("gates", like), state.gates)
    wider = {**like, "head": jax.ShapeDtypeStruct((CFG.num_layers, CFG.num_heads + 1), np.float32)}
    with pytest.raises(CheckpointLayoutError, match="does not match"):
        RunCheckpointer(tmp_path).restore_part("gates", wider)
    with pytest.raises(CheckpointLayoutError, match="does not match"):  # block gates the run did not train
        RunCheckpointer(tmp_path).restore_part("gates", {**like, "mlp": jax.ShapeDtypeStruct((2,), np.float32)})


def test_adding_a_domain_keeps_the_other_rows(trainer, decoder):
    state = trainer.init(DOMAIN_TOKENS)
    fresh_k0 = np.array(state.memory["k"][0])
    state, _ = trainer.train_step(state, BATCHES[1])
    old = host(state)
    bigger = KoffTrainer(decoder, KCFG.replace(num_domains=5))
    grown = host(bigger.grow(state, DOMAIN_TOKENS[:1]))
    for name in old.memory:
        np.testing.assert_array_equal(grown.memory[name][:4], old.memory[name])
        np.testing.assert_array_equal(grown.memory_opt.mu[name][:4], old.memory_opt.mu[name])
    np.testing.assert_array_equal(grown.memory_opt.count, list(old.memory_opt.count) + [0])
    np.testing.assert_array_equal(grown.memory["k"][4], fresh_k0)  # prefilled from domain 0's text
    assert_trees_equal(grown.gates, old.gates)


def test_sigterm_saves_a_checkpoint_and_stops(trainer, tmp_path):
    def batches():
        for i, batch in enumerate(BATCHES):
            if i == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    checkpointer = RunCheckpointer(tmp_path)
    state, status = train(trainer, trainer.init(DOMAIN_TOKENS), batches(), num_steps=6, checkpointer=checkpointer,
                          data_state=lambda: {"next_batch": 3})
    assert status == "preempted" and int(state.step) == 3 and checkpointer.latest_step() == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_nan_loss_stops_and_keeps_last_good_checkpoint(trainer, tmp_path):
    state = trainer.init(DOMAIN_TOKENS)
    state = state.replace(memory={**state.memory, "v": state.memory["v"].at[3].set(np.nan)})
    checkpointer = RunCheckpointer(tmp_path)
    batches = iter([BATCHES[0], BATCHES[0], BATCHES[2]])  # domain 3 (NaN memory) comes third
    with pytest.raises(NonFiniteLossError, match="last good checkpoint: step 2"):
        train(trainer, state, batches, num_steps=6, checkpointer=checkpointer, save_every=1)
    good, _ = checkpointer.restore(trainer.abstract_state)
    assert int(good.step) == 2 and np.all(np.isfinite(good.gates["head"]))


def test_an_interrupted_save_leaves_the_previous_step_latest(trainer, tmp_path):
    RunCheckpointer(tmp_path).save(1, trainer.init(DOMAIN_TOKENS))
    partial = tmp_path / "2.orbax-checkpoint-tmp-1700000000"  # what a save killed mid-write leaves
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "manifest.ocdbt").write_bytes(b"\0" * 10)
    checkpointer = RunCheckpointer(tmp_path)
    assert checkpointer.latest_step() == 1
    state, _ = checkpointer.restore(trainer.abstract_state)
    assert int(state.step) == 0
