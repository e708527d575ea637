"""One domain's memory module on disk: `memory.safetensors` + `manifest.json`, and fingerprints.

The manifest also records the SHA-256 of the weights file, checked before loading.
A module holds the domain's row of the memory table at full width (the training
layout: `k, v [L, M, Hkv, Dh]`, `{proj}_a [L, in, r]`, `{proj}_b [L, r, out]`), so
it fits the masked model and any compaction of the same mask alike; serving slices
it to the kept units on load. The manifest records the domain, shapes, LoRA scale
and the fingerprints of the base model and of the mask the module was trained
with; loading it for another backbone fails with both fingerprints named. It may
also carry the domain's routing centroid (`sparsemem.serve.routing`): the mean
hidden state of its training text at one block of the compacted backbone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Iterable, Mapping

import numpy as np
from safetensors.numpy import load_file, save_file

from sparsemem.files import DamagedFileError, atomic_write, read_json, write_json
from sparsemem.koff.gates import scales
from sparsemem.models.config import ModelConfig, to_hf_config
from sparsemem.models.hooks import PROJECTIONS, projection_shape

FORMAT = "sparsemem-memory-module/1"
MANIFEST, WEIGHTS = "manifest.json", "memory.safetensors"


class ModuleMismatchError(ValueError):
    """A memory module does not belong to the backbone it is loaded into."""


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_digests(folder: str | os.PathLike, digests: Mapping[str, str], fix: str) -> None:
    """Raise `DamagedFileError` naming the first file in `folder` whose SHA-256 is not the recorded one."""
    folder = pathlib.Path(folder)
    for name, want in sorted(digests.items()):
        path = folder / name
        got = file_digest(path) if path.is_file() else "missing"
        if got != want:
            raise DamagedFileError(path, f"SHA-256 {got[:16]}..., but {want[:16]}... was recorded at export: the "
                                         "file changed after export", fix)


def params_fingerprint(cfg: ModelConfig, params: Iterable[tuple[str, np.ndarray]]) -> str:
    """sha256 (16 hex digits) of the config and every named parameter's dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps(to_hf_config(cfg), sort_keys=True).encode())
    for name, value in sorted(params, key=lambda item: item[0]):
        value = np.ascontiguousarray(value)
        h.update(f"{name}:{value.dtype}:{value.shape};".encode())
        h.update(value.tobytes())
    return h.hexdigest()[:16]


def mask_fingerprint(masks: Mapping[str, np.ndarray]) -> str:
    """sha256 (16 hex digits) of which heads and neurons a 0/1 mask keeps (block masks folded in)."""
    h = hashlib.sha256()
    for keep in scales({k: np.asarray(v) for k, v in masks.items()}):
        keep = np.asarray(keep) > 0
        h.update(f"{keep.shape};".encode())
        h.update(np.packbits(keep).tobytes())
    return h.hexdigest()[:16]


def expected_shapes(cfg: ModelConfig, slots: int, rank: int, targets: Iterable[str]) -> dict[str, tuple[int, ...]]:
    L = cfg.num_layers
    shapes = {"k": (L, slots, cfg.num_kv_heads, cfg.head_dim), "v": (L, slots, cfg.num_kv_heads, cfg.head_dim)} \
        if slots else {}
    for proj in targets:
        fan_in, fan_out = projection_shape(cfg, proj)
        shapes[f"{proj}_a"], shapes[f"{proj}_b"] = (L, fan_in, rank), (L, rank, fan_out)
    return shapes


@dataclasses.dataclass
class MemoryModule:
    """One domain's KV memory and LoRA adapters (full width, no domain axis)."""

    domain: str
    arrays: dict[str, np.ndarray]
    lora_scale: float
    base_fingerprint: str
    mask_fingerprint: str
    centroid: np.ndarray | None = None  # [d] routing centroid at block `routing_layer` of the compacted backbone
    routing_layer: int | None = None

    @property
    def slots(self) -> int:
        return self.arrays["k"].shape[1] if "k" in self.arrays else 0

    @property
    def lora_targets(self) -> tuple[str, ...]:
        return tuple(p for p in PROJECTIONS if f"{p}_a" in self.arrays)

    @property
    def lora_rank(self) -> int:
        return self.arrays[f"{self.lora_targets[0]}_a"].shape[-1] if self.lora_targets else 0

    def check_fits(self, cfg: ModelConfig) -> None:
        """Raise `ModuleMismatchError` unless the arrays have the shapes `cfg` implies."""
        want = expected_shapes(cfg, self.slots, self.lora_rank, self.lora_targets)
        got = {name: tuple(x.shape) for name, x in self.arrays.items()}
        if got != want:
            raise ModuleMismatchError(f"memory module {self.domain!r} has arrays {got}, but a "
                                      f"{cfg.family} model with {cfg.num_layers} layers expects {want}")


def save_memory_module(module: MemoryModule, path: str | os.PathLike) -> pathlib.Path:
    """Write `path/memory.safetensors` then `path/manifest.json` (the manifest marks completion), each through a
    temporary file and a rename."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    arrays = {name: np.ascontiguousarray(np.asarray(x, np.float32)) for name, x in module.arrays.items()}
    atomic_write(path / WEIGHTS, lambda tmp: save_file(arrays, str(tmp)))
    manifest = {
        "format": FORMAT, "domain": module.domain, "lora_scale": module.lora_scale,
        "memory_slots": module.slots, "lora_rank": module.lora_rank, "lora_targets": list(module.lora_targets),
        "shapes": {name: list(x.shape) for name, x in arrays.items()}, "dtype": "float32",
        "base_fingerprint": module.base_fingerprint, "mask_fingerprint": module.mask_fingerprint,
        "sha256": {WEIGHTS: file_digest(path / WEIGHTS)},
    }
    if module.centroid is not None:
        manifest["routing"] = {"layer": int(module.routing_layer),
                               "centroid": np.asarray(module.centroid, np.float32).tolist()}
    write_json(path / MANIFEST, manifest)
    return path


def load_memory_module(path: str | os.PathLike, *, base_fingerprint: str | None = None,
                       mask_fingerprint: str | None = None) -> MemoryModule:
    """Read a module; refuse one whose weights file is not the one exported (SHA-256 in the manifest), damaged, or,
    with fingerprints given, made for another base model or mask."""
    path = pathlib.Path(path)
    if not (path / MANIFEST).exists() or not (path / WEIGHTS).exists():
        raise FileNotFoundError(f"{path} is not a memory module: expected {MANIFEST} and {WEIGHTS} "
                                "(written by `sparsemem export`)")
    fix = "export the module again (`sparsemem export`)"
    try:
        manifest = read_json(path / MANIFEST, fix)
    except DamagedFileError as err:
        raise ModuleMismatchError(str(err)) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ModuleMismatchError(f"{path / MANIFEST} has format {found!r}, expected {FORMAT!r}: not a sparsemem "
                                  f"memory module; {fix}")
    try:
        verify_digests(path, manifest.get("sha256") or {}, fix)  # manifests written before hashes: none to check
    except DamagedFileError as err:
        raise ModuleMismatchError(str(err)) from None
    try:
        arrays = load_file(str(path / WEIGHTS))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for a truncated/foreign file
        raise ModuleMismatchError(f"{path / WEIGHTS} is damaged or not a safetensors file ({err}); {fix}") from None
    shapes = {name: list(x.shape) for name, x in arrays.items()}
    if shapes != manifest["shapes"]:
        raise ModuleMismatchError(f"{path / WEIGHTS} holds {shapes} but its manifest lists {manifest['shapes']}; "
                                  "the module is corrupt, export it again")
    routing = manifest.get("routing")
    module = MemoryModule(manifest["domain"], arrays, float(manifest["lora_scale"]), manifest["base_fingerprint"],
                          manifest["mask_fingerprint"],
                          centroid=np.asarray(routing["centroid"], np.float32) if routing else None,
                          routing_layer=int(routing["layer"]) if routing else None)
    wrong = []
    if base_fingerprint is not None and module.base_fingerprint != base_fingerprint:
        wrong.append(f"base model fingerprint {module.base_fingerprint} (backbone: {base_fingerprint})")
    if mask_fingerprint is not None and module.mask_fingerprint != mask_fingerprint:
        wrong.append(f"mask fingerprint {module.mask_fingerprint} (backbone: {mask_fingerprint})")
    if wrong:
        raise ModuleMismatchError(f"memory module {module.domain!r} in {path} was made for another backbone: "
                                  + "; ".join(wrong) + ". Use the modules exported with this backbone, or export "
                                  "the backbone from the run that trained this module.")
    return module
