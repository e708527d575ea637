"""Paired bootstrap intervals over documents (or questions) and the verdicts computed from them.

Every quantity the report compares is a statistic of per-document numbers (loss sum and
token count per document and setting, or per-question correctness). Resampling the
documents with replacement *within each domain* (stratified: every resample keeps each
domain's size) and evaluating every setting on the same resample gives paired intervals:
the documents' own difficulty cancels in a difference. The interval is the percentile
interval of `resamples` draws, seeded, so a report is reproducible.

A claim "statistic > null" (or "< null") gets a verdict from its interval: *reproduces*
when the whole interval is on the claimed side, *contradicts* when the whole interval is on
the other side, *inconclusive* when it contains the null value.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

REPRODUCES, CONTRADICTS, INCONCLUSIVE = "reproduces", "contradicts", "inconclusive"


@dataclasses.dataclass(frozen=True)
class Interval:
    estimate: float  # the statistic on the data itself
    low: float
    high: float
    level: float = 0.95

    def verdict(self, null: float = 0.0, claim: str = ">") -> str:
        """`reproduces` / `contradicts` / `inconclusive` for the claim `statistic <claim> null`."""
        if claim not in (">", "<"):
            raise ValueError(f"claim {claim!r} must be '>' or '<'")
        above, below = self.low > null, self.high < null
        if not (above or below):
            return INCONCLUSIVE
        return REPRODUCES if above == (claim == ">") else CONTRADICTS

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return f"{self.estimate:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def stratified_resamples(strata: np.ndarray, resamples: int, seed: int = 0) -> np.ndarray:
    """`[resamples, N]` indices: each row draws, within every stratum, as many items as it has, with replacement."""
    strata = np.asarray(strata)
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, len(strata)), np.int64)
    for value in np.unique(strata):
        members = np.flatnonzero(strata == value)
        out[:, members] = members[rng.integers(0, len(members), size=(resamples, len(members)))]
    return out


def bootstrap(statistic: Callable[[np.ndarray], float], strata: np.ndarray, *, resamples: int = 2000,
              seed: int = 0, level: float = 0.95) -> Interval:
    """Percentile interval of `statistic(indices)` over stratified resamples of the items.

    `statistic` maps an index array (into the per-item arrays it closes over) to a number;
    `statistic(arange(N))` is the estimate. Pass one statistic computing a paired difference
    (both settings indexed by the same indices) to get a paired interval. Resamples on which
    the statistic is not finite (a ratio with a vanishing denominator) are left out.
    """
    strata = np.asarray(strata)
    if len(strata) == 0:
        raise ValueError("bootstrap needs at least one item (document or question)")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level} must be in (0, 1)")
    draws = np.array([statistic(idx) for idx in stratified_resamples(strata, resamples, seed)], np.float64)
    draws = draws[np.isfinite(draws)]
    estimate = float(statistic(np.arange(len(strata))))
    if len(draws) == 0:
        return Interval(estimate, float("nan"), float("nan"), level)
    tail = (1.0 - level) / 2
    low, high = np.quantile(draws, [tail, 1.0 - tail])
    return Interval(estimate, float(low), float(high), level)


def difference(a: Callable[[np.ndarray], float], b: Callable[[np.ndarray], float]) -> Callable[[np.ndarray], float]:
    """Statistic `a - b` on the same resampled items: bootstrapping it gives a paired interval."""
    return lambda idx: a(idx) - b(idx)


def domain_mean_loss(loss: np.ndarray, tokens: np.ndarray, domain: np.ndarray, num_domains: int
                     ) -> Callable[[np.ndarray], float]:
    """Statistic: mean over domains of each domain's loss per token (nats), on the documents indexed.

    `loss`, `tokens`: per-document sums; `domain`: each document's domain.
    """
    loss, tokens, domain = (np.asarray(a) for a in (loss, tokens, domain))

    def statistic(idx: np.ndarray) -> float:
        per_domain = (np.bincount(domain[idx], loss[idx], num_domains)
                      / np.bincount(domain[idx], tokens[idx], num_domains))
        return float(np.mean(per_domain))

    return statistic
