"""Every config in experiments/configs/ traces at full size through every jitted step of the pipeline.

No weights and no compilation: each step is traced with abstract arguments on the 8 fake
devices (`jax.jit(...).trace`, lowered where shardings meet, i.e. the sharded trainer
and scorer steps), so a 7-8B config's shape, sharding or integer-overflow bug shows up
here and not on a TPU slice. Steps: memory prefill, train, memory-only and eval steps,
the evaluation scorer, LAPE's activation counts, deterministic and baseline masks,
compaction (width rounding included), the export's routing centroids, the likelihood
router, and serving's prefill and decode on the compacted model with per-row memory.
Configs with identical shapes (a model on two corpora) are traced once.
"""

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsemem.analysis import lape
from sparsemem.evaluation.scoring import Scorer
from sparsemem.experiment.config import koff_config, load_config
from sparsemem.koff import baselines, sparsity
from sparsemem.koff.memory import prefill_kv
from sparsemem.models.config import ModelConfig, preset
from sparsemem.models.decoder import Decoder
from sparsemem.parallel.mesh import make_mesh
from sparsemem.serve import routing
from sparsemem.serve.compaction import CompactLayout, compact_decoder, round_masks
from sparsemem.serve.memory import expand_rows, slice_module
from sparsemem.train.trainer import KoffTrainer

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "experiments" / "configs").glob("*.py"))
DEVICES = 8
PROMPT, NEW_TOKENS = 64, 1  # serving: one prefill bucket, then one decode step


def architecture(config) -> ModelConfig:
    """The decoder a run of `config` builds: a paper config's model folder is named after its preset."""
    if config.model.source == "hf":
        return preset(pathlib.PurePath(config.model.path).name.lower())
    cfg = preset("gemma-3-270m")  # the embedded demo model; random models take its config, resized
    if config.model.source == "random":
        cfg = cfg.replace(**{k: v for k, v in config.model.random.to_dict().items() if k != "seed"})
    return cfg


def setting(path: pathlib.Path) -> tuple:
    """What a config's traces depend on: architecture, KOFF config, batch shapes and mesh."""
    config = load_config(str(path))
    fsdp, model = config.mesh.fsdp, config.mesh.model
    mesh = (math.gcd(config.data.batch_size, config.eval.batch_size, DEVICES // (fsdp * model)), fsdp, model)
    kcfg = koff_config(config, len(config.data.languages))
    return (architecture(config), kcfg, jnp.dtype(config.model.param_dtype).name, config.data.batch_size,
            config.data.seq_len, config.eval.batch_size, config.eval.seq_len, mesh)


def _settings() -> dict[tuple, list[str]]:
    groups: dict[tuple, list[str]] = {}
    for path in CONFIGS:
        groups.setdefault(setting(path), []).append(path.stem)
    return groups


SETTINGS = _settings()


def test_every_config_is_traced():
    assert sorted(name for names in SETTINGS.values() for name in names) == sorted(p.stem for p in CONFIGS)
    assert any(sparsity.ParamCounts.of(s[0]).prunable > 2**31 for s in SETTINGS)  # the overflow regime is covered


def sds(shape, dtype, sharding=None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)


def abstract(tree):
    return jax.tree.map(lambda x: sds(x.shape, x.dtype), tree)


def trace_training(trainer: KoffTrainer, rows: int, seq_len: int, eval_rows: int, eval_seq_len: int) -> None:
    """Trace and lower the sharded steps: memory prefill, train / memory / eval steps, scorer, LAPE counts."""
    cfg, kcfg, backbone = trainer.cfg, trainer.kcfg, trainer.backbone
    with backbone.context():
        for kind in ("train", "memory", "eval"):
            fn, args = trainer.compilable_step(kind, rows, seq_len)
            fn.trace(*args).lower()
        k, v = jax.eval_shape(lambda params, tokens: prefill_kv(backbone.decoder(params), tokens), backbone.params,
                              sds((kcfg.num_domains, kcfg.memory_slots), jnp.int32))
        assert k.shape == v.shape == (kcfg.num_domains, cfg.num_layers, kcfg.memory_slots, cfg.num_kv_heads,
                                      cfg.head_dim)
        losses = Scorer.for_trainer(trainer).trace(eval_rows, eval_seq_len)  # every evaluation setting's program
        losses.lower()
        batch = backbone.abstract_batch(eval_rows, eval_seq_len)
        assert losses.out_info.shape == (eval_rows, eval_seq_len)
        graphdef = nnx.graphdef(backbone.decoder(backbone.params))
        counts, _ = jax.eval_shape(lambda params, b: lape._active_counts(
            nnx.merge(graphdef, params), b, num_domains=kcfg.num_domains), backbone.params, batch)
        assert counts.shape == (kcfg.num_domains, cfg.num_layers, cfg.d_ff)


def trace_masks(cfg: ModelConfig, kcfg) -> dict[str, np.ndarray]:
    """The deterministic masks traced, then a concrete baseline mask at the target (the export's layout)."""
    gates = {"head": sds((cfg.num_layers, cfg.num_heads), jnp.float32),
             "neuron": sds((cfg.num_layers, cfg.d_ff), jnp.float32)}
    if kcfg.block_gates:
        gates.update(attn=sds((cfg.num_layers,), jnp.float32), mlp=sds((cfg.num_layers,), jnp.float32))
    jax.jit(sparsity.deterministic_masks, static_argnums=(0, 3)).trace(cfg, gates, jnp.float32(kcfg.target_sparsity),
                                                                       kcfg.sparsity_over)
    masks = baselines.random_mask(cfg, kcfg.target_sparsity, kcfg.sparsity_over)
    realised = float(sparsity.sparsity(cfg, sparsity.remaining_params(cfg, masks), kcfg.sparsity_over))
    assert realised == pytest.approx(kcfg.target_sparsity, abs=1e-3)
    return masks


def trace_serving(cfg: ModelConfig, param_dtype: str, masks: dict[str, np.ndarray], memory: dict, lora_scale: float):
    """Compaction, the export's routing centroid, the likelihood router, and serving's prefill + decode."""
    scores = {"head": np.random.default_rng(0).random(masks["head"].shape),
              "neuron": np.random.default_rng(1).random(masks["neuron"].shape)}
    rounded = CompactLayout.from_masks(cfg, round_masks(cfg, masks, scores, 128))
    assert all(w["neurons"] % 128 == 0 or w["neurons"] == cfg.d_ff for w in rounded.widths())
    layout = CompactLayout.from_masks(cfg, masks)
    dtype = jnp.dtype(param_dtype)
    model = nnx.eval_shape(lambda: compact_decoder(Decoder(cfg, rngs=nnx.Rngs(0), param_dtype=dtype), layout))
    widths = layout.widths()
    for block, width in zip(model.blocks, widths):
        assert (block.num_heads, block.num_kv_heads, block.num_neurons) == (
            width["heads"], width["kv_heads"], width["neurons"])

    rows = 2
    tokens, segments = sds((rows, PROMPT), jnp.int32), sds((rows, PROMPT), jnp.int32)
    layer = routing.default_layer(cfg.num_layers)
    truncated = nnx.eval_shape(lambda m: routing.truncated(m, layer), model)
    features = routing._token_features.trace(*nnx.split(truncated), tokens, segments).out_info
    assert features.shape == (rows, PROMPT, cfg.d_model)

    # Per-row memory in the compacted widths, from a full-width table of zeros that takes no memory.
    table = {name: np.broadcast_to(np.zeros((), x.dtype), x.shape) for name, x in memory.items()}
    layers = tuple(abstract(slice_module(cfg, layout, table, i)) for i in range(cfg.num_layers))
    row_memory = jax.eval_shape(lambda fetched, inv: expand_rows(fetched, inv, lora_scale), layers,
                                sds((rows,), jnp.int32))
    graphdef, state = nnx.split(model)
    routing._token_nll.trace(graphdef, state, tokens, segments, row_memory)

    def prefill(state, tokens, segments, memory):
        compact = nnx.merge(graphdef, state)
        cache = compact.init_cache(rows, PROMPT + NEW_TOKENS, memory)
        hidden, cache = compact(tokens, segment_ids=segments, cache=cache, memory=memory)
        return compact.logits(hidden[:, -1]), cache

    def decode(state, token, cache, memory):
        compact = nnx.merge(graphdef, state)
        hidden, cache = compact(token, segment_ids=jnp.ones_like(token), cache=cache, memory=memory)
        return compact.logits(hidden[:, -1]), cache

    logits, cache = jax.jit(prefill).trace(state, tokens, segments, row_memory).out_info
    assert logits.shape == (rows, cfg.vocab_size)
    logits, _ = jax.jit(decode).trace(state, sds((rows, 1), jnp.int32), cache, row_memory).out_info
    assert logits.shape == (rows, cfg.vocab_size)


@pytest.mark.parametrize("key", list(SETTINGS), ids=["+".join(names) for names in SETTINGS.values()])
def test_pipeline_traces_at_full_size(key):
    cfg, kcfg, param_dtype, rows, seq_len, eval_rows, eval_seq_len, mesh_shape = key
    mesh = make_mesh(dict(zip(("data", "fsdp", "model"), mesh_shape)), devices=jax.devices()[:math.prod(mesh_shape)])
    decoder = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.dtype(param_dtype)))
    trainer = KoffTrainer(decoder, kcfg, mesh)
    trace_training(trainer, rows, seq_len, eval_rows, eval_seq_len)
    masks = trace_masks(cfg, kcfg)
    trace_serving(cfg, param_dtype, masks, trainer.abstract_state.memory, kcfg.lora_scale)
