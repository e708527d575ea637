"""Paired bootstrap intervals over documents (or questions) and the verdicts computed from them.

Every quantity the report compares is a statistic of per-document numbers (loss sum and
token count per document and setting, or per-question correctness). Resampling the
documents with replacement *within each domain* (stratified: every resample keeps each
domain's size) and evaluating every setting on the same resample gives paired intervals:
the documents' own difficulty cancels in a difference. The interval is the percentile
interval of `resamples` draws, seeded, so a report is reproducible.

With several training seeds (`bootstrap` given one statistic per seed) the resampling is
two-way: each draw takes the seeds with replacement and the documents as above, and the value
is the mean over the drawn seeds of their statistics on the drawn documents, so an interval
covers training variance as well as the choice of documents.

A claim "statistic > null" (or "< null") gets a verdict from its interval: *reproduces*
when the whole interval is on the claimed side, *contradicts* when the whole interval is on
the other side, *inconclusive* when it contains the null value. A family of claims gets
Holm-adjusted verdicts (`holm`) from the draws' two-sided p-values (`p_value`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

REPRODUCES, CONTRADICTS, INCONCLUSIVE = "reproduces", "contradicts", "inconclusive"


@dataclasses.dataclass(frozen=True)
class Interval:
    estimate: float  # the statistic on the data itself
    low: float
    high: float
    level: float = 0.95
    resamples: int = 0  # draws made (0: not a bootstrap interval)
    dropped: int = 0  # draws left out because the statistic was not finite on them
    p_value: float | None = None  # two-sided bootstrap p-value against the null given to `bootstrap`

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


def bootstrap(statistic: Callable[[np.ndarray], float] | Sequence[Callable[[np.ndarray], float]],
              strata: np.ndarray, *, resamples: int = 2000, seed: int = 0, level: float = 0.95,
              null: float | None = None) -> Interval:
    """Percentile interval of `statistic(indices)` over stratified resamples of the items.

    `statistic` maps an index array (into the per-item arrays it closes over) to a number;
    `statistic(arange(N))` is the estimate. Pass one statistic computing a paired difference
    (both settings indexed by the same indices) to get a paired interval. A sequence of
    statistics, one per training seed on the same items, is resampled two-way (module
    docstring); the estimate is their mean. Resamples on which the statistic is not finite
    (a ratio with a vanishing denominator) are left out and counted in `dropped`. With `null`,
    the interval carries the two-sided p-value of "statistic = null" (`p_value`).
    """
    per_seed = list(statistic) if isinstance(statistic, Sequence) else [statistic]
    strata = np.asarray(strata)
    if len(strata) == 0:
        raise ValueError("bootstrap needs at least one item (document or question)")
    if not per_seed:
        raise ValueError("bootstrap needs at least one statistic (one per seed)")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level} must be in (0, 1)")
    seed_draws = np.random.default_rng([seed, 1]).integers(0, len(per_seed), (resamples, len(per_seed)))
    draws = np.empty(resamples)
    for r, idx in enumerate(stratified_resamples(strata, resamples, seed)):
        values = np.array([f(idx) for f in per_seed], np.float64)
        draws[r] = np.mean(values[seed_draws[r]]) if len(per_seed) > 1 else values[0]
    finite = draws[np.isfinite(draws)]
    estimate = float(np.mean([f(np.arange(len(strata))) for f in per_seed]))
    dropped = resamples - len(finite)
    if len(finite) == 0:
        return Interval(estimate, float("nan"), float("nan"), level, resamples, dropped)
    tail = (1.0 - level) / 2
    low, high = np.quantile(finite, [tail, 1.0 - tail])
    return Interval(estimate, float(low), float(high), level, resamples, dropped,
                    None if null is None else p_value(finite, null))


def p_value(draws: np.ndarray, null: float) -> float:
    """Two-sided bootstrap p-value of "statistic = null": twice the smaller tail of the draws at `null`,
    each tail counted with the +1 of the observed sample (never 0)."""
    n = len(draws)
    below, above = (np.sum(draws <= null) + 1) / (n + 1), (np.sum(draws >= null) + 1) / (n + 1)
    return float(min(1.0, 2.0 * min(below, above)))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment: adjusted p-values that control the family-wise error rate of the family."""
    p = np.asarray(p_values, np.float64)
    order = np.argsort(p, kind="stable")
    m = len(p)
    adjusted = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()


def adjusted_verdict(interval: Interval, adjusted_p: float, null: float, claim: str, alpha: float = 0.05) -> str:
    """The verdict of a claim in a family: decided only when its adjusted p-value is below `alpha`, then by the
    side of the null its estimate is on."""
    if adjusted_p >= alpha:
        return INCONCLUSIVE
    return REPRODUCES if (interval.estimate > null) == (claim == ">") else CONTRADICTS


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
