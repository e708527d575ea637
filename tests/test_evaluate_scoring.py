"""Scorer: dense losses match the model's own, masks and memories change them as the settings say."""

import numpy as np
import pytest
from flax import nnx

from sparsemem.evaluation import settings as settings_lib
from sparsemem.experiment import config as config_lib
from sparsemem.evaluation.documents import document_batches
from sparsemem.evaluation import scoring
from sparsemem.evaluation.scoring import Scorer, document_losses
from sparsemem.koff import gates as gates_lib
from sparsemem.koff.memory import hooks_from_rows
from sparsemem.koff.config import KoffConfig
from sparsemem.models.config import preset
from sparsemem.models.decoder import Decoder
from sparsemem.models.hooks import Hooks
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
    return decoder, Scorer.for_trainer(trainer), memory, batch


def _direct_losses(decoder, batch, masks=None, memory=None, index=None, lora_scale=1.0):
    """The losses with exactly the hooks a setting names (absent ones None), straight from the decoder."""
    head, neuron = gates_lib.scales(masks) if masks is not None else (None, None)
    rows = hooks_from_rows(memory, batch["domain"] if index is None else index, lora_scale) if memory else Hooks()
    hooks = Hooks(head_scale=head, neuron_scale=neuron, memory_k=rows.memory_k, memory_v=rows.memory_v, lora=rows.lora)
    hidden, _ = decoder(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"], hooks=hooks)
    return np.asarray(token_cross_entropy(decoder, hidden, batch["targets"])) * batch["loss_mask"]


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


def test_every_setting_shares_two_programs_and_scores_as_its_own_hooks(setup):
    """Masks as data and missing LoRA arrays as zeros change no loss; KV or not is the only program choice."""
    decoder, scorer, memory, batch = setup
    batch = {k: v[:, :11] for k, v in batch.items() if k != "domain"} | {"domain": batch["domain"]}  # a new shape
    masks = {"head": np.ones((2, 4), np.float32), "neuron": np.ones((2, 64), np.float32)}
    masks["neuron"][:, 40:] = 0
    settings = {"dense": {}, "pruned": {"masks": masks}, "pruned_kv": {"masks": masks, "memory": ("kv",)},
                "pruned_lora": {"masks": masks, "memory": ("lora",)}, "koff": {"masks": masks, "memory": ("kv", "lora")},
                "dense_memory": {"memory": ("kv", "lora")}}
    before = scoring._token_losses._cache_size()
    for name, setting in settings.items():
        table = settings_lib.memory_parts(memory, setting["memory"]) if "memory" in setting else None
        got = scorer.token_losses(batch, masks=setting.get("masks"), memory=table)  # the run's LoRA scale
        want = _direct_losses(decoder, batch, setting.get("masks"), table, lora_scale=scorer.lora_scale)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
    swapped = scorer.token_losses(batch, masks=masks, memory=memory, memory_index=np.full(6, 2))
    want = _direct_losses(decoder, batch, masks, memory, np.full(6, 2), scorer.lora_scale)
    np.testing.assert_allclose(swapped, want, rtol=1e-5, atol=1e-6)
    other = Scorer.for_trainer(KoffTrainer(decoder, KoffConfig(num_domains=3, memory_slots=2, lora_rank=2)))
    other.token_losses(batch, masks=masks)  # another trainer over the same decoder: the same programs
    assert scoring._token_losses._cache_size() - before == 2
    with pytest.raises(ValueError, match="not in this scorer's table"):
        scorer.token_losses(batch, memory={"up_a": memory["q_a"]})


def test_document_losses_equal_each_document_scored_alone(setup):
    """Packed windows score every target once, each as the document read alone up to it would (BOS, context)."""
    decoder, scorer, _, _ = setup
    rng = np.random.default_rng(1)
    seq_len, context, eos = 10, 3, 1
    docs = [[[2, *rng.integers(3, 300, n)] for n in lengths] for lengths in ([3, 14, 5], [25, 1])]  # 14, 25: windows
    packed = document_batches(docs, eos_id=eos, pad_id=0, seq_len=seq_len, context=context, batch_size=3,
                              first_position=2)
    got = document_losses(scorer, packed)
    np.testing.assert_array_equal(packed.domain, [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(packed.tokens, [4, 15, 6, 26, 2])  # every target once: text + EOS
    for n, ids in enumerate(ids for domain in docs for ids in domain):
        tokens = np.asarray([*ids, eos])
        expected = []
        for target in range(len(tokens) - 1):  # the window that scores `target`: BOS + >= `context` earlier tokens
            start = 0 if target < seq_len else seq_len + (target - seq_len) // (seq_len - context - 1) * (
                seq_len - context - 1)
            window = tokens[:target + 2] if start == 0 else np.concatenate([tokens[:1], tokens[start - context:target + 2]])
            positions = 2 + np.arange(len(window) - 1)[None]
            hidden, _ = decoder(window[None, :-1], positions=positions)
            expected.append(np.asarray(token_cross_entropy(decoder, hidden, window[None, 1:]))[0, -1])
        np.testing.assert_allclose(got.loss[n], np.sum(expected), rtol=1e-5)
        np.testing.assert_allclose(got.first[n], expected[0], rtol=1e-5)
    np.testing.assert_allclose(got.by_offset.sum(), got.loss.sum(), rtol=1e-6)
    assert got.count_by_offset.sum() == packed.tokens.sum() and got.count_by_offset[0] == 5


def test_rows_are_packed_longest_first_into_the_row_they_fill_best():
    lengths = [3, 6, 4, 7]  # targets per document (text + EOS); in order into rows of 10: [3, 6], [4], [7]
    docs = [[[2, *range(3, 3 + n - 1)] for n in lengths]]
    packed = document_batches(docs, eos_id=1, pad_id=0, seq_len=10, batch_size=4)
    (batch,) = packed.batches
    used = (batch["segment_ids"] > 0).sum(axis=1)
    np.testing.assert_array_equal(used, [10, 10, 0, 0])  # [7, 3] and [6, 4]
    np.testing.assert_array_equal(np.bincount(batch["document"][batch["document"] >= 0]), lengths)


def test_document_windows_carry_their_context_unscored():
    tokens = [[[2, *range(10, 40)]]]  # 30 text tokens + EOS: 31 targets
    packed = document_batches(tokens, eos_id=1, pad_id=0, seq_len=12, context=4, batch_size=8)
    batch = packed.batches[0]
    scored = batch["loss_mask"] > 0
    np.testing.assert_array_equal(np.sort(batch["offset"][scored]), np.arange(31))
    for row, segments in enumerate(batch["segment_ids"]):
        for segment in set(segments[segments > 0].tolist()):
            columns = np.flatnonzero(segments == segment)
            assert batch["inputs"][row, columns[0]] == 2  # every window starts with BOS
            if batch["offset"][row, columns].max() >= 12:  # a later window: BOS and >= 4 context targets unscored
                assert not scored[row, columns[:1 + 4]].any()
    with pytest.raises(ValueError, match="context=11"):
        document_batches(tokens, eos_id=1, pad_id=0, seq_len=12, context=11, batch_size=8)


def test_settings_use_retrained_ablations_when_trained():
    jointly = settings_lib.resolve(("koff",))
    assert "pruned_retrained" not in jointly
    assert jointly["pruned_lora"].memory == "koff" and jointly["pruned_lora"].parts == ("lora",)
    alone = settings_lib.resolve(("koff", "prune_only", "lora_only", "kv_only"))
    needs_own_variant = ("prune_then_memory",) + tuple(settings_lib.SETTINGS[8:])  # the ablation, starts, baselines
    assert list(alone) == [s for s in settings_lib.SETTINGS if s not in needs_own_variant]
    assert alone["dense_memory"].mask is None and alone["dense_memory"].memory == "koff"
    every = settings_lib.resolve(config_lib.VARIANTS)
    assert list(every) == list(settings_lib.SETTINGS)
    assert every["dense_memory"].mask == every["dense_memory"].memory == "dense_memory"
    assert every["random_mask"].memory is None and every["score_mask_memory"].memory == "score_mask_memory"
    assert alone["pruned_kv"].mask == "kv_only" and alone["pruned_kv"].memory == "kv_only"
    assert alone["pruned_retrained"].memory is None
    assert list(settings_lib.resolve(config_lib.VARIANTS, ("dense", "score_mask"))) == ["dense", "koff",
                                                                                         "score_mask"]
    with pytest.raises(ValueError, match="unknown settings"):
        settings_lib.resolve(("koff",), ("kof",))
    table = {"k": 1, "v": 2, "q_a": 3, "q_b": 4}
    assert settings_lib.memory_parts(table, ("lora",)) == {"q_a": 3, "q_b": 4}
