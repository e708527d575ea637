"""`sparsemem export`: a trained run -> compacted backbone + one memory module per domain.

`export` works on explicit pieces (dense decoder, 0/1 masks, memory table, domain
names); `export_run` resolves them from a run directory (`sparsemem run`): the
decoder from its config, `export/<variant>/mask.npz` and `memory/<domain>.npz`,
and, for width rounding, the gate scores of the latest checkpoint.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from sparsemem.checkpoints.memory_module import (MemoryModule, ModuleMismatchError, load_memory_module,
                                                 mask_fingerprint, params_fingerprint, save_memory_module)
from sparsemem.models.decoder import Decoder
from sparsemem.serve import routing
from sparsemem.serve.backbone import Backbone, load_backbone, save_backbone
from sparsemem.serve.compact import CompactLayout, compact_decoder, round_masks

log = logging.getLogger(__name__)

ROUTING_DOCUMENTS = 64  # training documents per domain averaged into its routing centroid


def model_fingerprint(decoder: Decoder) -> str:
    """Fingerprint of a dense decoder's config and weights."""
    flat = nnx.to_flat_state(nnx.state(decoder, nnx.Param))
    return params_fingerprint(decoder.cfg, ((".".join(map(str, p)), np.asarray(jax.device_get(v[...])))
                                            for p, v in flat))


def merge_lora(decoder: Decoder, module: MemoryModule) -> Decoder:
    """A copy of `decoder` with `module`'s LoRA deltas added to the projection weights (exact)."""
    graphdef, state = nnx.split(decoder)
    merged = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
    s = module.lora_scale
    targets = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up", "down": "w_down"}
    for proj in module.lora_targets:
        var = getattr(merged.layers, targets[proj])
        delta = np.einsum("lir,lro->lio", module.arrays[f"{proj}_a"], module.arrays[f"{proj}_b"]) * s
        var[...] = var[...] + delta.reshape(var.shape).astype(var.dtype)
    return merged


def export(decoder: Decoder, masks: Mapping[str, np.ndarray], table: Mapping[str, np.ndarray],
           domains: Sequence[str], lora_scale: float, out: str | pathlib.Path, *,
           scores: Mapping[str, np.ndarray] | None = None, round_to: int | None = None,
           merge_domain: str | None = None, tokenizer_file: str | pathlib.Path | None = None,
           routing_texts: Mapping[str, Sequence[Sequence[int]]] | None = None,
           routing_layer: int | None = None) -> pathlib.Path:
    """Write `out/backbone/` (compacted) and `out/modules/<domain>/` for each row of `table [D, ...]`.

    `round_to` rounds kept widths up to a multiple, keeping the best-`scores` pruned
    units (modules stay full-width, so they fit either way). `merge_domain` folds
    that domain's LoRA into the backbone weights for single-domain deployment.
    `routing_texts` (token ids of training documents per domain) give each module its
    routing centroid at block `routing_layer` (default: the middle one) of the
    compacted backbone; see `sparsemem.serve.routing`.
    """
    out = pathlib.Path(out)
    cfg = decoder.cfg
    base_fp, mask_fp = model_fingerprint(decoder), mask_fingerprint(masks)
    modules = {name: MemoryModule(name, {k: np.asarray(v[i]) for k, v in table.items()}, float(lora_scale),
                                  base_fp, mask_fp) for i, name in enumerate(domains)}
    if round_to:
        if scores is None:
            raise ValueError("round_to needs unit scores (keep probabilities) to pick the next-best units")
        masks = round_masks(cfg, masks, scores, round_to)
    layout = CompactLayout.from_masks(cfg, masks)
    if merge_domain is not None:
        if merge_domain not in modules:
            raise ValueError(f"cannot merge unknown domain {merge_domain!r}; known domains: {', '.join(domains)}")
        decoder = merge_lora(decoder, modules[merge_domain])
    backbone = Backbone(compact_decoder(decoder, layout), layout, base_fp, mask_fp, merge_domain)
    if routing_texts is not None:
        add_centroids(backbone.model, modules.values(), routing_texts, routing_layer)
    for module in modules.values():
        save_memory_module(module, out / "modules" / module.domain)
    save_backbone(backbone, out / "backbone", tokenizer_file)
    log.info("exported %s: %d domains, widths per layer %s", out, len(modules), layout.widths())
    return out


def routing_documents(source, tokenizer, max_tokens: int, count: int = ROUTING_DOCUMENTS) -> list[list[int]]:
    """Token ids of `count` training documents of a domain, spread over its split, each cut to `max_tokens`."""
    from sparsemem.experiment.setup import spread, token_ids  # noqa: PLC0415

    return [ids[:max_tokens] for ids in token_ids(spread(source, count), tokenizer)]


def add_modules(out: str | pathlib.Path, decoder: Decoder, masks: Mapping[str, np.ndarray],
                table: Mapping[str, np.ndarray], domains: Sequence[str], lora_scale: float,
                routing_texts: Mapping[str, Sequence[Sequence[int]]]) -> None:
    """Write modules for `domains` (rows of `table`, trained under `masks`) into an existing export.

    Refuses a backbone exported from another base model or mask; the new modules'
    centroids use the same block as the modules already there.
    """
    out = pathlib.Path(out)
    backbone = load_backbone(out / "backbone")
    base_fp, mask_fp = model_fingerprint(decoder), mask_fingerprint(masks)
    if (base_fp, mask_fp) != (backbone.base_fingerprint, backbone.mask_fingerprint):
        raise ModuleMismatchError(f"{out / 'backbone'} (base {backbone.base_fingerprint}, mask "
                                  f"{backbone.mask_fingerprint}) was not exported from the model and mask these "
                                  f"modules were trained with (base {base_fp}, mask {mask_fp}); export the run again")
    existing = [load_memory_module(p) for p in sorted((out / "modules").glob("*")) if (p / "manifest.json").exists()]
    layer = next((m.routing_layer for m in existing if m.routing_layer is not None), None)
    modules = [MemoryModule(name, {k: np.asarray(v[i]) for k, v in table.items()}, float(lora_scale), base_fp,
                            mask_fp) for i, name in enumerate(domains)]
    add_centroids(backbone.model, modules, routing_texts, layer)
    for module in modules:
        save_memory_module(module, out / "modules" / module.domain)


def add_centroids(model, modules: Iterable[MemoryModule], texts: Mapping[str, Sequence[Sequence[int]]],
                  layer: int | None = None) -> None:
    """Set each module's routing centroid from its domain's documents in `texts`, on the compacted `model`."""
    layer = routing.default_layer(model.cfg.num_layers) if layer is None else layer
    for module in modules:
        if module.domain not in texts:
            raise ValueError(f"no routing texts for domain {module.domain!r}; give training documents of every "
                             f"exported domain (have: {', '.join(texts)})")
        module.centroid = routing.centroid(model, texts[module.domain], layer, model.cfg.bos_id)
        module.routing_layer = layer


def _gate_scores(checkpoint_dir: pathlib.Path) -> dict[str, np.ndarray]:
    """Keep probabilities of every head and neuron from the latest run checkpoint (block gates folded in)."""
    from sparsemem.checkpoints.run_state import RunCheckpointer  # noqa: PLC0415
    from sparsemem.koff import gates, sparsity  # noqa: PLC0415

    checkpointer = RunCheckpointer(checkpoint_dir)
    if checkpointer.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir}: rounding widths needs the trained gates")
    state = checkpointer.restore_arrays()
    checkpointer.close()
    keep = sparsity.keep_probs({k: np.asarray(v) for k, v in state["gates"].items()})
    head, neuron = gates.scales(keep)
    return {"head": np.asarray(head), "neuron": np.asarray(neuron)}


def export_run(run_dir: str | pathlib.Path, variant: str = "koff", out: str | pathlib.Path | None = None, *,
               round_to: int | None = None, merge_domain: str | None = None,
               routing_layer: int | None = None) -> pathlib.Path:
    """Export `variant` of a `sparsemem run` directory (default output: `<run>/export/<variant>/serve`).

    Every module gets the routing centroid of its domain's training text (the run's
    domains and those added by `sparsemem extend`).
    """
    from sparsemem.experiment.export import load_mask  # noqa: PLC0415
    from sparsemem.experiment.extend import all_sources  # noqa: PLC0415
    from sparsemem.experiment.rundir import RunDir  # noqa: PLC0415
    from sparsemem.experiment.setup import load_model  # noqa: PLC0415
    from sparsemem.koff import config as koff_config  # noqa: PLC0415

    run = RunDir(run_dir)
    config = run.config()
    masks = load_mask(run, variant)
    memory_files = sorted((run.path / "export" / variant / "memory").glob("*.npz"))
    domains = [p.stem for p in memory_files]
    rows = [dict(np.load(p)) for p in memory_files]
    table = {k: np.stack([r[k] for r in rows]) for k in rows[0]} if rows else {}
    decoder, tokenizer = load_model(config, None)
    sources = {s.name: s for s in all_sources(run, config, "train")}
    texts = {name: routing_documents(sources[name], tokenizer, config.data.seq_len) for name in domains
             if name in sources}
    if len(texts) < len(domains):
        log.warning("no training text for domain(s) %s in the run's corpus: exporting without routing centroids "
                    "(--domain auto will be unavailable)", sorted(set(domains) - set(texts)))
        texts = None
    if config.model.source == "hf":
        folder = pathlib.Path(config.model.path)
    else:
        from sparsemem.checkpoints.gguf import demo_model_dir  # noqa: PLC0415

        folder = demo_model_dir()
    scores = _gate_scores(run.path / "checkpoints" / variant) if round_to else None
    lora_scale = koff_config.lora_scale(config.koff.lora_alpha, config.koff.lora_rank)
    tokenizer_file = folder / "tokenizer.json"
    return export(decoder, masks, table, domains, lora_scale, out or run.path / "export" / variant / "serve",
                  scores=scores, round_to=round_to, merge_domain=merge_domain,
                  tokenizer_file=tokenizer_file if tokenizer_file.exists() else None, routing_texts=texts,
                  routing_layer=routing_layer)

