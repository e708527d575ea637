"""Language activation probability entropy (LAPE; Tang et al. 2024) against a pruning mask.

For every MLP neuron (layer l, neuron f) and domain d, the activation probability
`P[d, l, f]` is the fraction of held-out tokens on which the neuron's gate
pre-activation is positive (act(gate) > 0 for SiLU and GELU). Normalising `P`
over domains gives a distribution whose entropy is low when the neuron fires for
few languages: the `specific_fraction` lowest-entropy neurons, among those whose
largest activation probability is at least the `min_activation_quantile` quantile,
are "language-specific"; the same fraction with the highest entropy are "language-general".
For each set we compare the fraction the mask removes with random neuron sets of the
same size and count per layer (a layer-stratified permutation test, both tails) and give
the effect (removed fraction minus chance) with the interval that inverts that test.

Activity is counted inside the decoder's own layer scan (`Decoder.gate_activity`): one
forward per batch, reduced on the device to per-domain counts `[D, L, F]`.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsemem.evaluation import bootstrap  # Interval: the effect's interval and verdict
from sparsemem.models.decoder import Decoder

log = logging.getLogger(__name__)


@functools.partial(nnx.jit, static_argnames="num_domains")
def _active_counts(decoder: Decoder, batch: dict, num_domains: int) -> tuple[jax.Array, jax.Array]:
    """Per domain, `[D, L, F]` active-token counts and `[D]` real tokens of one batch."""
    per_row = decoder.gate_activity(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    real = jnp.sum(batch["segment_ids"] > 0, axis=1, dtype=jnp.int32)
    return (jax.ops.segment_sum(jnp.moveaxis(per_row, 1, 0), batch["domain"], num_domains),
            jax.ops.segment_sum(real, batch["domain"], num_domains))


def activation_probabilities(decoder: Decoder, batches: list[dict], num_domains: int
                             ) -> tuple[np.ndarray, np.ndarray]:
    """`(P [D, L, F], tokens [D])`: per domain, the fraction of real tokens on which each MLP neuron is active.

    One forward per batch; `batches` hold `inputs`, `positions`, `segment_ids` (0: padding)
    `[B, T]` and each row's `domain [B]`.
    """
    L, F = decoder.cfg.num_layers, decoder.cfg.d_ff
    counts, tokens = np.zeros((num_domains, L, F), np.int64), np.zeros(num_domains, np.int64)
    for batch in batches:
        c, t = jax.device_get(_active_counts(decoder, {k: jnp.asarray(v) for k, v in batch.items()},
                                             num_domains=num_domains))
        counts += c
        tokens += t
    log.info("activation statistics: %d batches, %s tokens per domain", len(batches), tokens.tolist())
    if np.any(tokens == 0):
        raise ValueError(f"no held-out tokens for domain(s) {np.flatnonzero(tokens == 0).tolist()}")
    return counts / tokens[:, None, None], tokens


def lape(probs: np.ndarray) -> np.ndarray:
    """Entropy `[L, F]` of each neuron's activation probabilities normalised over domains (axis 0)."""
    total = probs.sum(0, keepdims=True)
    p = np.divide(probs, total, out=np.full_like(probs, 1.0 / probs.shape[0]), where=total > 0)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=0)


def _ranked_neurons(probs: np.ndarray, *, fraction: float, min_activation_quantile: float, lowest: bool) -> np.ndarray:
    entropy = lape(probs)
    peak = probs.max(0)
    candidates = peak >= np.quantile(peak, min_activation_quantile)
    count = int(round(fraction * entropy.size))
    key = np.where(candidates, entropy if lowest else -entropy, np.inf)
    order = np.argsort(key, axis=None, kind="stable")[:count]
    out = np.zeros(entropy.size, bool)
    out[order] = True
    return out.reshape(entropy.shape)


def specific_neurons(probs: np.ndarray, *, fraction: float, min_activation_quantile: float) -> np.ndarray:
    """Boolean `[L, F]`: the `fraction` of all neurons with lowest LAPE among sufficiently active ones."""
    return _ranked_neurons(probs, fraction=fraction, min_activation_quantile=min_activation_quantile, lowest=True)


def general_neurons(probs: np.ndarray, *, fraction: float, min_activation_quantile: float) -> np.ndarray:
    """Boolean `[L, F]`: the `fraction` of all neurons with highest LAPE (language-general) among active ones."""
    return _ranked_neurons(probs, fraction=fraction, min_activation_quantile=min_activation_quantile, lowest=False)


def removal_test(chosen: np.ndarray, removed: np.ndarray, *, permutations: int, seed: int = 0,
                 level: float = 0.95) -> dict:
    """Removed fraction among the `chosen` neurons vs chance, in both directions.

    Chance is a random neuron set of the same size per layer (layer-stratified
    permutations); `p_removed` / `p_kept` are the one-sided p-values for "removed more
    / less often than chance". `effect` is the removed fraction minus chance's mean, with
    the interval that inverts the permutation test under a shift (observed minus the
    null's central `level` spread): it excludes 0 exactly when the two-sided test at
    1 - `level` rejects, and it stays honest for small sets where resampling the set
    itself would have no spread (e.g. none of them removed).
    """
    observed = float(removed[chosen].mean()) if chosen.any() else float("nan")
    rng = np.random.default_rng(seed)
    per_layer = chosen.sum(1)
    draws = np.zeros(permutations)
    for i in range(permutations):
        hits = 0
        for layer, k in enumerate(per_layer):
            if k:
                hits += removed[layer, rng.choice(removed.shape[1], k, replace=False)].sum()
        draws[i] = hits / max(per_layer.sum(), 1)
    tail = (1.0 - level) / 2
    spread_low, spread_high = np.quantile(draws - draws.mean(), [tail, 1.0 - tail])
    effect = observed - draws.mean()
    return {"neurons": int(chosen.sum()), "removed_among_chosen": observed,
            "removed_among_all": float(removed.mean()), "chance_mean": float(draws.mean()),
            "chance_95": float(np.quantile(draws, 0.95)),
            "p_removed": float((np.sum(draws >= observed) + 1) / (permutations + 1)),
            "p_kept": float((np.sum(draws <= observed) + 1) / (permutations + 1)),
            "effect": bootstrap.Interval(float(effect), float(effect - spread_high), float(effect - spread_low),
                                         level).as_dict()}


def specialisation(probs: np.ndarray, masks: dict[str, dict[str, np.ndarray]], domains: list[str], *,
                   fraction: float, min_activation_quantile: float, permutations: int, tokens: list[int]) -> dict:
    """The analysis the report shows, for every variant's neuron mask.

    Per mask, two tests: language-specific neurons (claim: preferentially removed) and
    language-general ones (claim: preferentially kept); `tokens` is the activation
    statistics' token count per domain.
    """
    sets = {"specific": specific_neurons(probs, fraction=fraction, min_activation_quantile=min_activation_quantile),
            "general": general_neurons(probs, fraction=fraction, min_activation_quantile=min_activation_quantile)}
    dominant = np.argmax(probs, axis=0)
    entropy = lape(probs)
    return {
        "domains": domains,
        "tokens": dict(zip(domains, (int(t) for t in tokens))),
        "specific_per_layer": sets["specific"].sum(1).astype(int).tolist(),
        "specific_by_domain": {d: int(np.sum(sets["specific"] & (dominant == i))) for i, d in enumerate(domains)},
        "entropy_max": float(np.log(len(domains))),
        "tests": {variant: {name: removal_test(chosen, m["neuron"] == 0, permutations=permutations)
                            for name, chosen in sets.items()}
                  for variant, m in masks.items()},
        "entropy_hist": {variant: {"removed": np.histogram(entropy[m["neuron"] == 0], bins=20,
                                                           range=(0, np.log(len(domains))))[0].tolist(),
                                   "kept": np.histogram(entropy[m["neuron"] > 0], bins=20,
                                                        range=(0, np.log(len(domains))))[0].tolist()}
                         for variant, m in masks.items()},
    }
