"""Routing: pick the memory module of an unlabelled prompt, per row of a batch.

Two routers over the same compacted backbone:

* `CentroidRouter` (the one served): a prompt's feature is the mean, over its tokens
  (BOS excluded), of the residual stream after block `layer`, RMS-normalised by the
  model's final norm; the prompt goes to the domain whose centroid (the mean feature of
  its training documents, stored in each module's manifest at export) is nearest in
  Euclidean distance. Cost: `layer + 1` of the backbone's blocks over the prompt, once,
  plus a `[B, d] x [d, D]` product, so hundreds of domains cost nothing extra.
* `LikelihoodRouter` (the reference): the domain under whose memory the prompt's tokens
  are most likely. Exact by construction, but one forward pass per domain.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsemem.models.loss import token_cross_entropy
from sparsemem.serve.compact_decoder import CompactDecoder, RowMemory
from sparsemem.serve.memory import MemoryBank

LENGTH_BUCKET = 16  # prompts are right-padded to a multiple of this, so few shapes compile
LOSS_CHUNK = 256  # tokens per vocabulary-logits chunk (Gemma: 256 x 262k floats = 268 MB)


class RoutingError(ValueError):
    """The loaded modules cannot be routed between (no centroids, or centroids of different layers)."""


def default_layer(num_layers: int) -> int:
    """The middle block: deep enough for topic, not only script; half a prefill of the prompt in cost."""
    return num_layers // 2


def truncated(model: CompactDecoder, layer: int) -> CompactDecoder:
    """A view of `model` whose output is the (final-normed) residual stream after block `layer`; shares weights."""
    if not 0 <= layer < model.cfg.num_layers:
        raise RoutingError(f"routing layer {layer} is outside the backbone's blocks 0..{model.cfg.num_layers - 1}")
    return CompactDecoder(model.cfg.replace(num_layers=layer + 1), model.embed[...], model.final_norm[...], None,
                          list(model.blocks)[: layer + 1], dtype=model.dtype)


def pad_right(prompts: Sequence[Sequence[int]], pad_id: int, bucket: int = LENGTH_BUCKET
              ) -> tuple[np.ndarray, np.ndarray]:
    """`tokens, segment_ids [B, T]` with `T` the longest prompt rounded up to `bucket` (segment 0 = padding)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("routing needs at least one prompt and every prompt needs at least one token")
    length = -(-max(len(p) for p in prompts) // bucket) * bucket
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    segments = np.zeros((len(prompts), length), np.int32)
    for row, ids in enumerate(prompts):
        tokens[row, : len(ids)], segments[row, : len(ids)] = ids, 1
    return tokens, segments


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_features(graphdef, state, tokens, segments):
    hidden, _ = nnx.merge(graphdef, state)(tokens, segment_ids=segments)
    return hidden.astype(jnp.float32)


def token_features(model: CompactDecoder, tokens: np.ndarray, segments: np.ndarray, layer: int) -> np.ndarray:
    """Per-token features `[B, T, d]` after block `layer` (causal: position t sees only tokens <= t)."""
    graphdef, state = nnx.split(truncated(model, layer))
    return np.asarray(_token_features(graphdef, state, jnp.asarray(tokens), jnp.asarray(segments)))


def prefix_means(features: np.ndarray, tokens: np.ndarray, segments: np.ndarray, lengths: np.ndarray,
                 bos_id: int | None) -> np.ndarray:
    """`[B, d]`: each row's mean feature over its first `lengths[b]` tokens, BOS and padding excluded."""
    T = tokens.shape[1]
    keep = (segments > 0) & (np.arange(T)[None] < np.asarray(lengths)[:, None])
    if bos_id is not None:
        keep &= tokens != bos_id
    keep |= (segments > 0) & (np.arange(T)[None] == 0) & ~keep.any(1, keepdims=True)  # a lone BOS still counts
    return np.einsum("bt,btd->bd", keep, features) / keep.sum(1, keepdims=True)


def prompt_features(model: CompactDecoder, prompts: Sequence[Sequence[int]], layer: int,
                    bos_id: int | None) -> np.ndarray:
    """`[B, d]`: the routing feature of each prompt (token ids)."""
    tokens, segments = pad_right(prompts, model.cfg.pad_id)
    lengths = np.asarray([len(p) for p in prompts])
    return prefix_means(token_features(model, tokens, segments, layer), tokens, segments, lengths, bos_id)


def centroid(model: CompactDecoder, documents: Sequence[Sequence[int]], layer: int, bos_id: int | None,
             batch_size: int = 8) -> np.ndarray:
    """`[d]`: the mean routing feature of a domain's documents (each document weighs the same)."""
    if not documents:
        raise ValueError("a centroid needs at least one document")
    features = [prompt_features(model, documents[i: i + batch_size], layer, bos_id)
                for i in range(0, len(documents), batch_size)]
    return np.concatenate(features).mean(0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class CentroidRouter:
    """Nearest centroid of the prompt's mean hidden state at block `layer`."""

    domains: tuple[str, ...]
    centroids: np.ndarray  # [D, d]
    layer: int

    def __post_init__(self):
        if np.shape(self.centroids) != (len(self.domains), np.shape(self.centroids)[-1]):
            raise RoutingError(f"{np.shape(self.centroids)[0]} centroids for {len(self.domains)} domains")

    def scores(self, features: np.ndarray) -> np.ndarray:
        """`[B, D]`: minus the squared distance of each feature to each centroid (higher = closer)."""
        c = np.asarray(self.centroids, np.float64)
        f = np.asarray(features, np.float64)
        return 2 * f @ c.T - (c * c).sum(1)[None] - (f * f).sum(1)[:, None]

    def route(self, model: CompactDecoder, prompts: Sequence[Sequence[int]], bos_id: int | None) -> list[str]:
        best = self.scores(prompt_features(model, prompts, self.layer, bos_id)).argmax(1)
        return [self.domains[i] for i in best]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_nll(graphdef, state, tokens, segments, memory):
    model = nnx.merge(graphdef, state)
    hidden, _ = model(tokens, segment_ids=segments, memory=memory)
    nll = token_cross_entropy(model, hidden[:, :-1], tokens[:, 1:], chunk_size=LOSS_CHUNK)
    return nll * (segments[:, 1:] > 0)


def token_nll(model: CompactDecoder, tokens: np.ndarray, segments: np.ndarray,
              memory: RowMemory | None) -> np.ndarray:
    """`[B, T-1]`: negative log-likelihood of token t+1 given tokens <= t (0 at padding), text after the memory."""
    graphdef, state = nnx.split(model)
    return np.asarray(_token_nll(graphdef, state, jnp.asarray(tokens), jnp.asarray(segments), memory))


def nll_under_each_domain(model: CompactDecoder, bank: MemoryBank, tokens: np.ndarray,
                          segments: np.ndarray) -> np.ndarray:
    """`[D, B, T-1]`: `token_nll` of the whole batch under each domain's memory in turn."""
    batch = tokens.shape[0]
    return np.stack([token_nll(model, tokens, segments, bank.rows([name] * batch)) for name in bank.domains])


@dataclasses.dataclass(frozen=True)
class LikelihoodRouter:
    """The domain under whose memory the prompt is most likely (mean token log-likelihood)."""

    bank: MemoryBank

    def route(self, model: CompactDecoder, prompts: Sequence[Sequence[int]]) -> list[str]:
        tokens, segments = pad_right(prompts, model.cfg.pad_id)
        nll = nll_under_each_domain(model, self.bank, tokens, segments).sum(-1)  # [D, B]
        return [self.bank.domains[i] for i in nll.argmin(0)]
