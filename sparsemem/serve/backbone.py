"""The compacted backbone on disk: HF-named safetensors with per-layer shapes, plus the kept-unit layout.

`config.json` is the base model's Hugging Face config with a `sparsemem` section:
format, per-layer widths, the layout (original indices of kept heads, KV heads,
neurons), the fingerprints of the base model and of the training mask, and the
domain whose LoRA was merged into the weights (if any), and the SHA-256 of every other
file of the folder (checked before loading). Tensors use the Hugging
Face names of the base model; each layer's shapes are its kept widths.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil

import numpy as np
from safetensors.numpy import save_file

from sparsemem.checkpoints.hf import SafetensorsFolder, TensorMap, atomic_write, tensor_maps
from sparsemem.checkpoints.memory_module import file_digest, verify_digests
from sparsemem.models.config import from_hf_config, layer_shapes, to_hf_config
from sparsemem.serve.chat import TEMPLATE_FILES
from sparsemem.serve.compaction import CompactLayout, build_compact
from sparsemem.serve.compact_decoder import CompactDecoder

FORMAT = "sparsemem-compact-backbone/1"


@dataclasses.dataclass
class Backbone:
    """A loaded compacted backbone and what it was made from."""

    model: CompactDecoder
    layout: CompactLayout
    base_fingerprint: str
    mask_fingerprint: str
    merged_domain: str | None
    path: pathlib.Path | None = None


def _hf_shape(tmap: TensorMap, shape: tuple[int, ...]) -> tuple[int, ...]:
    """`tmap.hf_shape`, also for layers with no kept units (zero-size tensors)."""
    if tmap.kind == "linear":
        return (int(np.prod(shape[tmap.in_dims:])), int(np.prod(shape[:tmap.in_dims])))
    return tmap.hf_shape(shape)


def _to_hf(tmap: TensorMap, ours: np.ndarray) -> np.ndarray:
    if tmap.kind == "linear":
        return np.ascontiguousarray(ours.reshape(_hf_shape(tmap, ours.shape)[::-1]).T)
    return tmap.to_hf(ours)


def save_backbone(backbone: Backbone, path: str | os.PathLike, tokenizer_file: str | os.PathLike | None = None) -> None:
    """Write `config.json`, `model.safetensors` (and copies of `tokenizer_file` and the chat template files next to
    it) into `path`, each through a temporary file."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model, cfg = backbone.model, backbone.model.cfg
    maps = tensor_maps(cfg)
    tensors = {maps["embed"].hf_name: np.asarray(model.embed[...]),
               maps["final_norm"].hf_name: np.asarray(model.final_norm[...])}
    if not cfg.tie_embeddings:
        tensors[maps["unembed"].hf_name] = np.asarray(model.unembed[...])
    for i, blk in enumerate(model.blocks):
        for name in layer_shapes(cfg):
            tmap = maps[f"layers.{name}"]
            tensors[tmap.hf_name.format(layer=i)] = _to_hf(tmap, np.asarray(getattr(blk, name)[...]))
    atomic_write(path / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    written = ["model.safetensors"]
    if tokenizer_file is not None:  # the tokenizer and, where the model has them, its chat template files
        source = pathlib.Path(tokenizer_file)
        for name, origin in [("tokenizer.json", source)] + [(n, source.parent / n) for n in TEMPLATE_FILES]:
            if origin.is_file():
                atomic_write(path / name, lambda tmp, origin=origin: shutil.copyfile(origin, tmp))
                written.append(name)
    hf = to_hf_config(cfg)
    hf["sparsemem"] = {"format": FORMAT, "widths": backbone.layout.widths(), "layout": backbone.layout.to_json(),
                       "base_fingerprint": backbone.base_fingerprint, "mask_fingerprint": backbone.mask_fingerprint,
                       "merged_lora_domain": backbone.merged_domain,
                       "sha256": {name: file_digest(path / name) for name in written}}
    atomic_write(path / "config.json", lambda tmp: tmp.write_text(json.dumps(hf, indent=1)))


def load_backbone(path: str | os.PathLike) -> Backbone:
    """Read a backbone written by `save_backbone`, after checking its files' SHA-256 against `config.json`."""
    path = pathlib.Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found; a compacted backbone folder is written by "
                                "`sparsemem export`")
    hf = json.loads(config_file.read_text())
    meta = hf.pop("sparsemem", None)
    if not meta or meta.get("format") != FORMAT:
        raise ValueError(f"{config_file} is not a compacted sparsemem backbone (no 'sparsemem' section of format "
                         f"{FORMAT!r}); load plain Hugging Face folders with load_hf_checkpoint")
    verify_digests(path, meta.get("sha256") or {}, "export the run again (`sparsemem export`)")
    cfg = from_hf_config(hf)
    layout = CompactLayout.from_json(meta["layout"])
    folder = SafetensorsFolder(path)
    maps = tensor_maps(cfg)

    def read(key: str, shape: tuple[int, ...], layer: int | None = None) -> np.ndarray:
        tmap = maps[key]
        name = tmap.hf_name.format(layer=layer) if layer is not None else tmap.hf_name
        if name not in folder.shapes:
            raise ValueError(f"{path / 'model.safetensors'} lacks {name}; export the backbone again")
        if tuple(folder.shapes[name]) != _hf_shape(tmap, shape):
            raise ValueError(f"{name} in {path} has shape {folder.shapes[name]}, but the layout in config.json "
                             f"implies {_hf_shape(tmap, shape)}; the folder is inconsistent, export it again")
        return tmap.to_ours(folder.get(name), shape)

    d, v = cfg.d_model, cfg.vocab_size
    layers = []
    for i, width in enumerate(layout.widths()):
        shapes = layer_shapes(cfg, width["heads"], width["kv_heads"], width["neurons"])
        layers.append({name: read(f"layers.{name}", shape, i) for name, shape in shapes.items()})
    unembed = None if cfg.tie_embeddings else read("unembed", (v, d))
    model = build_compact(cfg, layout, layers, read("embed", (v, d)), read("final_norm", (d,)), unembed)
    return Backbone(model, layout, meta["base_fingerprint"], meta["mask_fingerprint"], meta["merged_lora_domain"],
                    path)
