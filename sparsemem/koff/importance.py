"""The importance start of the gates: `log_alpha` spread by each unit's rank in a one-shot score.

With `koff.gate_init = "importance"` the gates do not start tied (every unit at the same
`log_alpha`, where a dozen noisy steps decide the ranking) but ordered by a one-shot
importance score, the Taylor score of `koff/baselines.py` on the score mask's own
calibration batches. Within each unit type (query heads, MLP neurons: the types
`sparsity.deterministic_masks` ranks separately) the unit of rank `r` in `[0, 1]`
(0 = lowest score, ties by index as in `baselines.masks_from_scores`) starts at

    log_alpha = log_alpha_for(init_keep_prob) + importance_spread * (r - 1/2),

so the median unit starts where the uniform start puts every unit, the best one `spread / 2` above it
(inside `log_alpha_clamp`, checked by `KoffConfig`), and the order is strict.
The deterministic mask of this start at any target is therefore the score mask at that
target, unit for unit; with `gate_lr = 0` (frozen gates) a run trains its memories under
exactly that mask, and with `gate_lr > 0` learning moves the ranking from there.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from sparsemem.koff import gates as gates_lib
from sparsemem.koff.config import KoffConfig
from sparsemem.models.config import ModelConfig


def unit_ranks(scores: np.ndarray) -> np.ndarray:
    """Each score's ascending rank scaled to `[0, 1]` (ties by flat index), in the shape of `scores`."""
    flat = np.ravel(np.asarray(scores, np.float64))
    if not np.all(np.isfinite(flat)):
        raise ValueError("unit scores must be finite")
    rank = np.empty(flat.size)
    rank[np.argsort(flat, kind="stable")] = np.arange(flat.size)
    return (rank / max(flat.size - 1, 1)).reshape(np.shape(scores))


def importance_log_alphas(cfg: ModelConfig, kcfg: KoffConfig, scores: Mapping[str, np.ndarray]
                          ) -> dict[str, np.ndarray]:
    """`{"head": [L, H], "neuron": [L, F]}` float32 starting `log_alpha`s ordered by `scores` (module docstring)."""
    expected = {"head": (cfg.num_layers, cfg.num_heads), "neuron": (cfg.num_layers, cfg.d_ff)}
    wrong = {name: np.shape(scores[name]) for name in expected if name in scores and
             np.shape(scores[name]) != expected[name]}
    if set(scores) != set(expected) or wrong:
        raise ValueError(f"importance scores need arrays {expected} (heads [L, H], neurons [L, F]); got "
                         f"{ {name: np.shape(v) for name, v in scores.items()} }")
    top = gates_lib.log_alpha_for(kcfg.init_keep_prob)
    return {name: (top + kcfg.importance_spread * (unit_ranks(scores[name]) - 0.5)).astype(np.float32)
            for name in expected}
