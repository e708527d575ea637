"""grain pipeline: packing invariants, mixing, determinism, resume, process shards, evaluation pass."""

import collections
import json
import logging

import numpy as np
import pytest
import tokenizers

from sparsemem.data import pipeline
from sparsemem.data.sources import DomainSource
from sparsemem.tokenizer import Tokenizer

SEQ_LEN = 16
PAD, EOS, BOS = 0, 1, 2


def make_documents(domain: str, count: int, seed: int) -> list[dict]:
    """Documents of unique words (`<domain>d<i>w<j>`), lengths 1..40 words, so every token is traceable."""
    rng = np.random.default_rng(seed)
    return [{"text": " ".join(f"{domain}d{i}w{j}" for j in range(rng.integers(1, 41))).encode()}
            for i in range(count)]


@pytest.fixture(scope="module")
def corpus():
    return {"aa": make_documents("aa", 30, 0), "bb": make_documents("bb", 20, 1), "cc": make_documents("cc", 12, 2)}


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    vocab = {"[PAD]": PAD, "[EOS]": EOS, "[BOS]": BOS, "[UNK]": 3}
    for documents in corpus.values():
        for document in documents:
            for word in document["text"].decode().split():
                vocab.setdefault(word, len(vocab))
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    model.save(str(path))
    return Tokenizer(path, bos_id=BOS, eos_id=EOS, pad_id=PAD)


@pytest.fixture(scope="module")
def sources(corpus):
    return [DomainSource(name, documents) for name, documents in corpus.items()]


def expected_documents(tokenizer, source):
    return [tuple(tokenizer.encode(r["text"].decode())) + (EOS,) for r in source.records]


def segments(batch):
    """(domain, tokens of the segment incl. its last target, positions) for every segment of every row."""
    out = []
    for row in range(len(batch["domain"])):
        for segment in np.unique(batch["segment_ids"][row]):
            if segment == 0:
                continue
            where = np.flatnonzero(batch["segment_ids"][row] == segment)
            tokens = tuple(batch["inputs"][row, where]) + (batch["targets"][row, where[-1]],)
            out.append((int(batch["domain"][row]), tokens, batch["positions"][row, where], where))
    return out


def check_row_invariants(batch):
    assert set(batch) == {"inputs", "targets", "loss_mask", "segment_ids", "positions", "domain"}
    assert batch["inputs"].shape == batch["targets"].shape == batch["segment_ids"].shape == batch["positions"].shape
    assert batch["inputs"].dtype == batch["targets"].dtype == batch["segment_ids"].dtype == np.int32
    assert batch["domain"].dtype == np.int32 and batch["domain"].shape == batch["inputs"].shape[:1]
    np.testing.assert_array_equal(batch["loss_mask"], (batch["segment_ids"] > 0).astype(np.float32))
    np.testing.assert_array_equal(batch["inputs"][batch["segment_ids"] == 0], PAD)
    for _, tokens, positions, where in segments(batch):
        # A segment is one contiguous document piece: positions restart at 0, targets are the next inputs.
        np.testing.assert_array_equal(where, np.arange(where[0], where[0] + len(where)))
        np.testing.assert_array_equal(positions, np.arange(len(where)))


def test_eval_pass_visits_every_document_once_packed_without_crossing(tokenizer, sources):
    batches = list(pipeline.eval_batches(sources, tokenizer, seq_len=SEQ_LEN, batch_size=4,
                                         shard=pipeline.Shard(0, 1)))
    documents = {d: expected_documents(tokenizer, s) for d, s in enumerate(sources)}
    # Words are unique per document, so a non-special token pins down (domain, document, position).
    where_is = {t: (d, i, p) for d, docs in documents.items() for i, doc in enumerate(docs)
                for p, t in enumerate(doc) if t not in (BOS, EOS)}
    pairs = collections.Counter()
    for batch in batches:
        assert batch["inputs"].shape == (4, SEQ_LEN)
        check_row_invariants(batch)
        for domain, tokens, _, _ in segments(batch):
            # Each segment is a contiguous slice of a single document of the row's domain.
            inner = [where_is[t] for t in tokens if t not in (BOS, EOS)]
            first_domain, first_document, first_position = inner[0]
            assert first_domain == domain and {i for _, i, _ in inner} == {first_document}
            assert [p for _, _, p in inner] == list(range(first_position, first_position + len(inner)))
        for row in range(4):
            real = batch["segment_ids"][row] > 0
            pairs.update((domain_row, i, t) for domain_row, i, t in zip(
                [int(batch["domain"][row])] * int(real.sum()), batch["inputs"][row, real].tolist(),
                batch["targets"][row, real].tolist()))
    # Every (input, next token) pair of every document appears exactly once: no token lost or repeated.
    expected = collections.Counter((d, a, b) for d, docs in documents.items() for doc in docs
                                   for a, b in zip(doc[:-1], doc[1:]))
    assert pairs == expected
    assert any(len(doc) - 1 > SEQ_LEN for docs in documents.values() for doc in docs)  # splitting was exercised


def test_rows_hold_one_domain_and_targets_stay_in_document(tokenizer, sources):
    batches = pipeline.train_batches(sources, tokenizer, seq_len=SEQ_LEN, batch_size=8, seed=3,
                                     shard=pipeline.Shard(0, 1))
    words_of = {d: {w for doc in expected_documents(tokenizer, s) for w in doc} - {BOS, EOS}
                for d, s in enumerate(sources)}
    for _ in range(10):
        batch = next(batches)
        check_row_invariants(batch)
        for domain, tokens, _, _ in segments(batch):
            assert set(tokens) - {BOS, EOS} <= words_of[domain]


def test_training_is_deterministic_and_resumes_mid_epoch(tokenizer, sources):
    def run(seed):
        return pipeline.train_batches(sources, tokenizer, seq_len=SEQ_LEN, batch_size=4, seed=seed,
                                      mixture=2.0, shard=pipeline.Shard(0, 1))

    first, second = run(7), run(7)
    head = [next(first) for _ in range(5)]
    for a, b in zip(head, [next(second) for _ in range(5)]):
        np.testing.assert_equal(a, b)
    state = json.loads(json.dumps(first.get_state()))  # plain JSON: storable in the run's orbax checkpoint
    continued = [next(first) for _ in range(20)]  # crosses epoch boundaries of the smaller domains
    resumed = run(7)
    resumed.set_state(state)
    for a, b in zip(continued, [next(resumed) for _ in range(20)]):
        np.testing.assert_equal(a, b)
    other = run(8)
    assert any(not np.array_equal(a["inputs"], next(other)["inputs"]) for a in head)


def test_mixture_proportions_follow_weights(tokenizer, sources):
    batches = pipeline.train_batches(sources, tokenizer, seq_len=SEQ_LEN, batch_size=10, seed=0,
                                     mixture={"aa": 6, "bb": 3, "cc": 1}, shard=pipeline.Shard(0, 1))
    counts = collections.Counter(np.concatenate([next(batches)["domain"] for _ in range(10)]).tolist())
    assert counts == {0: 60, 1: 30, 2: 10}
    np.testing.assert_allclose(pipeline.mixture_weights(sources, 1.0), np.array([30, 20, 12]) / 62)
    assert pipeline.mixture_weights(sources, None) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="exactly the domains"):
        pipeline.mixture_weights(sources, {"aa": 1.0})


def test_process_shards_are_disjoint_and_cover(tokenizer, sources):
    per_shard = []
    for index in range(3):
        batches = pipeline.eval_batches(sources, tokenizer, seq_len=SEQ_LEN, batch_size=4,
                                        shard=pipeline.Shard(index, 3))
        per_shard.append(collections.Counter(
            tokens[1] for batch in batches for _, tokens, _, _ in segments(batch) if tokens[0] == BOS))
    # The first word of each document identifies it.
    for a in range(3):
        for b in range(a + 1, 3):
            assert not set(per_shard[a]) & set(per_shard[b])
    union = sum(per_shard, collections.Counter())
    assert union == collections.Counter(d[1] for s in sources for d in expected_documents(tokenizer, s))


def test_long_document_policies(tokenizer, sources, caplog):
    long_source = [DomainSource("aa", [{"text": " ".join(f"aad0w{j}" for j in range(40)).encode()}])]
    with pytest.raises(ValueError, match="raise seq_len"):
        next(iter(pipeline.eval_batches(long_source, tokenizer, seq_len=SEQ_LEN, batch_size=2,
                                        shard=pipeline.Shard(0, 1), long_documents="error")))
    with caplog.at_level(logging.WARNING):
        batches = list(pipeline.eval_batches(long_source, tokenizer, seq_len=SEQ_LEN, batch_size=2,
                                             shard=pipeline.Shard(0, 1), long_documents="truncate"))
    assert "Truncated 1 document" in caplog.text
    assert sum(int(b["loss_mask"].sum()) for b in batches) == SEQ_LEN
    with pytest.raises(ValueError, match="'drop' is not a valid LongDocuments"):
        pipeline.train_batches(long_source, tokenizer, seq_len=SEQ_LEN, batch_size=2, shard=pipeline.Shard(0, 1),
                               long_documents="drop")


def test_bad_arguments_are_named(tokenizer, sources):
    with pytest.raises(ValueError, match="too few to give each"):
        pipeline.train_batches([DomainSource("x", [{"text": b"aad0w0"}])], tokenizer, seq_len=8, batch_size=2,
                               shard=pipeline.Shard(1, 2))
    with pytest.raises(ValueError, match="has no documents"):
        DomainSource("empty", [])
    with pytest.raises(ValueError, match="No domains"):
        pipeline.train_batches([], tokenizer, seq_len=8, batch_size=2)


def test_default_shard_is_this_jax_process():
    assert pipeline.Shard.of_jax_process() == pipeline.Shard(0, 1)
    with pytest.raises(ValueError, match=r"must be in \[0, 2\)"):
        pipeline.Shard(2, 2)
