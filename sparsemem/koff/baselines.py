"""Structured masks that do not come from KOFF's gates: the baselines KOFF's mask is judged against.

- `dense_mask`: every unit kept (memories trained on the unpruned model: the upper
  bound of what memories can recover).
- `random_mask`: query heads and MLP neurons removed in a uniformly random order until
  the target sparsity (the same GQA-aware accounting as KOFF's deterministic mask).
- `taylor_scores` / `score_mask`: first-order Taylor importance of each unit's gate,
  `I_u = mean over calibration batches of |dL/dz_u|` at `z = 1` (dense model), with `L`
  the mean next-token loss. This is the head-importance score of Michel et al. 2019
  ("Are Sixteen Heads Really Better than One?") applied to MLP neurons as well (the
  gate-Taylor criterion of Molchanov et al. 2019): `|dL/dz_u|` is the first-order
  estimate of the loss change when unit u is removed. The lowest-scoring units of each
  type are removed until the target.
Every mask here goes through `sparsity.deterministic_masks`, KOFF's own rule: heads and
neurons are ranked separately and each type gives up the target share of its params, so
a baseline differs from KOFF's mask only in *which* units go, not in how many of each type.
  It needs only the decoder's existing hooks (a gradient through `head_scale` and
  `neuron_scale`), no activation capture.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sparsemem.koff import sparsity
from sparsemem.models.config import ModelConfig
from sparsemem.models.hooks import Hooks
from sparsemem.models.loss import token_cross_entropy

SOURCES = ("gates", "dense", "random", "score")  # where a variant's mask comes from


def dense_mask(cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Every query head and MLP neuron kept."""
    return {"head": np.ones((cfg.num_layers, cfg.num_heads), np.float32),
            "neuron": np.ones((cfg.num_layers, cfg.d_ff), np.float32)}


def masks_from_scores(cfg: ModelConfig, scores: Mapping[str, np.ndarray], target: float,
                      over: str = "prunable") -> dict[str, np.ndarray]:
    """0/1 masks removing the lowest-scoring heads and neurons until the realised sparsity is nearest `target`.

    Only the order of the scores within each unit type matters (`sparsity.deterministic_masks`
    allocates the budget between heads and neurons); ties keep the earlier unit (layer-major order).
    """
    flat = np.concatenate([np.ravel(scores["head"]), np.ravel(scores["neuron"])]).astype(np.float64)
    if not np.all(np.isfinite(flat)):
        raise ValueError("unit scores must be finite")
    rank = np.empty(flat.size)
    rank[np.argsort(flat, kind="stable")] = np.arange(flat.size)
    # Ranks as log_alphas in [-3, 3]: keep probabilities keep the order and stay far from float32 saturation.
    log_alpha = (6.0 * rank / max(flat.size - 1, 1) - 3.0).astype(np.float32)
    n_heads = np.size(scores["head"])
    masks = sparsity.deterministic_masks(cfg, {"head": log_alpha[:n_heads].reshape(cfg.num_layers, cfg.num_heads),
                                               "neuron": log_alpha[n_heads:].reshape(cfg.num_layers, cfg.d_ff)},
                                         target, over)
    return {name: np.asarray(m, np.float32) for name, m in jax.device_get(masks).items()}


def random_mask(cfg: ModelConfig, target: float, over: str = "prunable", seed: int = 0) -> dict[str, np.ndarray]:
    """Heads and neurons removed in a random order (seeded) until the target sparsity."""
    rng = np.random.default_rng(seed)
    scores = {"head": rng.random((cfg.num_layers, cfg.num_heads)), "neuron": rng.random((cfg.num_layers, cfg.d_ff))}
    return masks_from_scores(cfg, scores, target, over)


def taylor_scores(trainer, batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """`{"head": [L, H], "neuron": [L, F]}`: mean over `batches` of |d(mean token loss)/d(gate)| at the dense model.

    `trainer` is a `KoffTrainer` (its frozen backbone, mesh and loss chunk are used).
    """
    cfg, backbone = trainer.cfg, trainer.backbone

    def loss(scales, params, batch):
        decoder = backbone.decoder(params)
        hidden, _ = decoder(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                            hooks=Hooks(head_scale=scales["head"], neuron_scale=scales["neuron"]))
        ce = token_cross_entropy(decoder, hidden, batch["targets"], chunk_size=trainer.kcfg.loss_chunk)
        return jnp.sum(ce * batch["loss_mask"]) / jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)

    grad = jax.jit(jax.grad(loss))
    ones = {name: jnp.asarray(m) for name, m in dense_mask(cfg).items()}
    total, count = {name: np.zeros(m.shape) for name, m in ones.items()}, 0
    for batch in batches:
        placed = trainer.place_batch(batch)
        with backbone.context():
            g = jax.device_get(grad(ones, backbone.params, placed))
        for name in total:
            total[name] += np.abs(np.asarray(g[name], np.float64))
        count += 1
    if count == 0:
        raise ValueError("taylor_scores needs at least one calibration batch (train.calibration_batches >= 1)")
    return {name: value / count for name, value in total.items()}
