"""FLOPs of the KOFF steps: counted from the traced program, and an analytic count from the configs.

XLA's `compiled.cost_analysis()` counts the body of every while loop once (measured:
a 2- and a 4-layer decoder report the same FLOPs), and the decoder scans over layers,
micro-batches and loss chunks. So the program count walks the step's jaxpr instead,
multiplying scan bodies by their length; it counts matrix products (`dot_general`),
which is what MFU is about. Both counts are global (all chips together).
"""

from __future__ import annotations

import math

from jax.extend import core

from sparsemem.koff.config import KoffConfig
from sparsemem.models.config import ModelConfig
from sparsemem.models.hooks import projection_shape


def _dot_flops(eqn) -> int:
    lhs = eqn.invars[0].aval
    (contract, _), _ = eqn.params["dimension_numbers"]
    return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[d] for d in contract)


def jaxpr_flops(jaxpr: core.Jaxpr | core.ClosedJaxpr) -> int:
    """Matmul FLOPs of `jaxpr`: `dot_general`s, scan bodies times their length, the costlier `cond` branch."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            total += _dot_flops(eqn)
        elif eqn.primitive.name == "scan":
            total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"])
        elif eqn.primitive.name == "cond":
            total += max(jaxpr_flops(branch) for branch in eqn.params["branches"])
        elif eqn.primitive.name == "while":
            raise ValueError("jaxpr_flops: a while loop has no static trip count; use lax.scan")
        else:
            for sub in core.jaxprs_in_params(eqn.params):
                total += jaxpr_flops(sub)
    return total


def _layer_flops(cfg: ModelConfig, kcfg: KoffConfig | None, batch: int, seq_len: int) -> dict[str, int]:
    """Forward matmul FLOPs of one layer over `batch x seq_len` tokens, by kind; `kcfg=None`: the plain model.

    `down` and `lora_out` (the down projection and its LoRA `b` product) only feed the
    residual stream at the block's end: a fully rematerialised block does not
    recompute them unless a post-MLP norm needs their result.
    """
    n, d, h, hkv, dh = batch * seq_len, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    out = dict(dense=2 * n * d * (h * dh + 2 * hkv * dh) + 2 * n * h * dh * d + 2 * 2 * n * d * cfg.d_ff,
               down=2 * n * cfg.d_ff * d, lora=0, lora_out=0)
    keys = seq_len + (kcfg.memory_slots if kcfg is not None else 0)
    out["attention"] = 2 * 2 * n * keys * h * dh  # scores and weighted values, dense over all keys
    if kcfg is not None and kcfg.lora_rank:
        r = kcfg.lora_rank
        out["lora"] = sum(2 * n * r * sum(projection_shape(cfg, name)) for name in kcfg.lora_targets)
        if "down" in kcfg.lora_targets:
            out["lora"] -= 2 * n * r * d
            out["lora_out"] = 2 * n * r * d
    return out


def _loss_tokens(tokens: int, chunk_size: int) -> int:
    """Tokens the chunked loss computes logits for, padding of the last chunk included."""
    chunk = min(chunk_size, tokens)
    return math.ceil(tokens / chunk) * chunk


def train_step_flops(cfg: ModelConfig, kcfg: KoffConfig, batch: int, seq_len: int, *,
                     recompute: bool = True) -> int:
    """Analytic matmul FLOPs of one KOFF train step over a global `[batch, seq_len]` batch.

    Forward with gates and memory; backward to the activations (the frozen backbone
    gets no weight gradients: x1 the dense products) and to the memory (attention and
    LoRA: x2); each loss computes its logits once and its gradient w.r.t. the hidden
    states in the same pass (`sparsemem.models.loss`). With `recompute=False` the
    rematerialised products (remat policy) are left out: the model FLOPs that MFU is
    quoted against.
    """
    layer = _layer_flops(cfg, kcfg, batch, seq_len)
    micro_tokens = _loss_tokens(batch // kcfg.accum_steps * seq_len, kcfg.loss_chunk)
    unembed = 2 * kcfg.accum_steps * micro_tokens * cfg.d_model * cfg.vocab_size
    per_layer = (layer["dense"] + layer["down"]) * 2 + (layer["attention"] + layer["lora"] + layer["lora_out"]) * 3
    total = cfg.num_layers * per_layer + unembed * 2
    if kcfg.kl_weight > 0:  # the dense reference forward; both logits, the gradient through the model's only
        ref = _layer_flops(cfg, None, batch, seq_len)
        total += cfg.num_layers * sum(ref.values()) + unembed * 3
    if recompute:
        if kcfg.remat == "full":
            skipped = 0 if cfg.post_norms else layer["down"] + layer["lora_out"]
            total += cfg.num_layers * (sum(layer.values()) - skipped)
        elif kcfg.remat == "dots":  # products with a dot batch dimension are not saved
            total += cfg.num_layers * (layer["attention"] + layer["lora"])
    return total


def forward_flops(cfg: ModelConfig, batch: int, seq_len: int, *, logits: bool) -> int:
    """Analytic matmul FLOPs of a plain forward over `batch x seq_len` tokens, with or without the vocabulary head."""
    head = 2 * batch * seq_len * cfg.d_model * cfg.vocab_size if logits else 0
    return cfg.num_layers * sum(_layer_flops(cfg, None, batch, seq_len).values()) + head


def score_flops(cfg: ModelConfig, kcfg: KoffConfig, batch: int, seq_len: int) -> int:
    """Analytic matmul FLOPs of the evaluation program (`Scorer`): one forward with the memory, and its logits."""
    unembed = 2 * _loss_tokens(batch * seq_len, kcfg.loss_chunk) * cfg.d_model * cfg.vocab_size
    return cfg.num_layers * sum(_layer_flops(cfg, kcfg, batch, seq_len).values()) + unembed
