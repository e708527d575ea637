"""Write an export folder: the compacted backbone and one memory module per domain.

```
<out>/backbone/            config.json (with the layout), model.safetensors, tokenizer.json
<out>/modules/<domain>/    manifest.json, memory.safetensors
```
Everything here works on explicit pieces (dense decoder, 0/1 masks, memory table,
domain names, routing texts) and knows nothing of run directories: `sparsemem export`
resolves those pieces from a run (`sparsemem.experiment.run_export`).
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
from sparsemem.models.hooks import PROJECTION_WEIGHTS
from sparsemem.serve import routing
from sparsemem.serve.backbone import Backbone, load_backbone, save_backbone
from sparsemem.serve.compaction import CompactLayout, compact_decoder, round_masks

log = logging.getLogger(__name__)


def model_fingerprint(decoder: Decoder) -> str:
    """Fingerprint of a dense decoder's config and weights."""
    flat = nnx.to_flat_state(nnx.state(decoder, nnx.Param))
    return params_fingerprint(decoder.cfg, ((".".join(map(str, p)), np.asarray(jax.device_get(v[...])))
                                            for p, v in flat))


def merge_lora(decoder: Decoder, module: MemoryModule) -> Decoder:
    """A copy of `decoder` with `module`'s LoRA deltas added to the projection weights (exact)."""
    graphdef, state = nnx.split(decoder)
    merged = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
    for proj in module.lora_targets:
        var = getattr(merged.layers, PROJECTION_WEIGHTS[proj])
        delta = np.einsum("lir,lro->lio", module.arrays[f"{proj}_a"], module.arrays[f"{proj}_b"]) * module.lora_scale
        var[...] = var[...] + delta.reshape(var.shape).astype(var.dtype)
    return merged


def _modules(table: Mapping[str, np.ndarray], domains: Sequence[str], lora_scale: float, base_fp: str,
             mask_fp: str) -> list[MemoryModule]:
    """One module per row of `table [D, ...]`, named by `domains`."""
    return [MemoryModule(name, {k: np.asarray(v[i]) for k, v in table.items()}, float(lora_scale), base_fp, mask_fp)
            for i, name in enumerate(domains)]


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
    modules = {m.domain: m for m in _modules(table, domains, lora_scale, base_fp, mask_fp)}
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
    modules = _modules(table, domains, lora_scale, base_fp, mask_fp)
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
