"""Paired bootstrap over documents: a known difference is detected, a null difference is called inconclusive."""

import numpy as np
import pytest

from sparsemem.evaluation import bootstrap

DOMAINS, DOCS = 3, 40


def synthetic(rng, shift):
    """Per-document loss sums of two settings on the same documents; B is A plus `shift` nats per token."""
    domain = np.repeat(np.arange(DOMAINS), DOCS)
    tokens = rng.integers(50, 400, size=domain.size).astype(float)
    difficulty = rng.normal(3.0, 0.8, size=domain.size)  # shared by both settings: pairing cancels it
    a = (difficulty + rng.normal(0, 0.3, domain.size)) * tokens
    b = (difficulty + shift + rng.normal(0, 0.3, domain.size)) * tokens
    return domain, tokens, a, b


def paired_difference(domain, tokens, a, b):
    mean_a = bootstrap.domain_mean_loss(a, tokens, domain, DOMAINS)
    mean_b = bootstrap.domain_mean_loss(b, tokens, domain, DOMAINS)
    return lambda idx: mean_b(idx) - mean_a(idx)


def test_a_known_difference_is_detected_and_covered():
    verdicts, covered = [], 0
    for seed in range(20):
        domain, tokens, a, b = synthetic(np.random.default_rng(seed), shift=0.25)
        interval = bootstrap.bootstrap(paired_difference(domain, tokens, a, b), domain, resamples=400, seed=seed)
        verdicts.append(interval.verdict(0.0, ">"))
        covered += interval.low <= 0.25 <= interval.high
        assert interval.verdict(0.0, "<") in (bootstrap.CONTRADICTS, bootstrap.INCONCLUSIVE)
    assert verdicts.count(bootstrap.REPRODUCES) >= 19
    assert covered >= 16  # nominal 95%: 19 of 20 expected


def test_a_null_difference_is_called_inconclusive():
    verdicts = []
    for seed in range(20):
        domain, tokens, a, b = synthetic(np.random.default_rng(100 + seed), shift=0.0)
        interval = bootstrap.bootstrap(paired_difference(domain, tokens, a, b), domain, resamples=400, seed=seed)
        verdicts.append(interval.verdict(0.0, ">"))
    assert verdicts.count(bootstrap.INCONCLUSIVE) >= 17  # a false verdict has ~5% chance per data set


def test_pairing_makes_the_interval_narrower_than_ignoring_it():
    domain, tokens, a, b = synthetic(np.random.default_rng(7), shift=0.05)
    paired = bootstrap.bootstrap(paired_difference(domain, tokens, a, b), domain, resamples=400)
    mean_a = bootstrap.domain_mean_loss(a, tokens, domain, DOMAINS)
    mean_b = bootstrap.domain_mean_loss(b, tokens, domain, DOMAINS)
    independent = iter(bootstrap.stratified_resamples(domain, 401, seed=8))  # A and B on different documents
    unpaired = bootstrap.bootstrap(lambda idx: mean_b(idx) - mean_a(next(independent)), domain, resamples=400)
    assert paired.high - paired.low < 0.5 * (unpaired.high - unpaired.low)
    assert paired.verdict() == bootstrap.REPRODUCES


def test_stratified_resamples_keep_every_domain_size():
    strata = np.array([0, 0, 0, 1, 1, 2])
    draws = bootstrap.stratified_resamples(strata, 50, seed=1)
    assert draws.shape == (50, 6)
    np.testing.assert_array_equal(strata[draws], np.broadcast_to(strata, (50, 6)))


def test_domain_mean_loss_is_the_mean_of_per_domain_token_means():
    stat = bootstrap.domain_mean_loss(np.array([2.0, 6.0, 9.0]), np.array([1.0, 3.0, 3.0]), np.array([0, 0, 1]), 2)
    assert stat(np.arange(3)) == pytest.approx(((2 + 6) / 4 + 3.0) / 2)


def test_verdicts_and_bad_input():
    assert bootstrap.Interval(0.3, 0.1, 0.5).verdict(0.0, ">") == bootstrap.REPRODUCES
    assert bootstrap.Interval(0.3, 0.1, 0.5).verdict(0.0, "<") == bootstrap.CONTRADICTS
    assert bootstrap.Interval(0.1, -0.1, 0.5).verdict(0.0, ">") == bootstrap.INCONCLUSIVE
    assert bootstrap.Interval(0.9, 0.8, 1.2).verdict(1.0, "<") == bootstrap.INCONCLUSIVE
    with pytest.raises(ValueError, match="at least one item"):
        bootstrap.bootstrap(lambda idx: 0.0, np.array([]))
    with pytest.raises(ValueError, match="claim"):
        bootstrap.Interval(0, 0, 0).verdict(0.0, ">=")
