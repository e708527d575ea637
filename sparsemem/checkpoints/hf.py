"""Hugging Face folders (`config.json` + `*.safetensors`, sharded index too) <-> `Decoder`.

Loading never needs torch and never holds more than one parameter on the host at a
time: the model's abstract state gives every parameter's shape and sharding, and
each array is built with `jax.make_array_from_callback`, so every device receives
only its own shard. All missing, unexpected and mis-shaped tensors are reported
together in one `CheckpointMismatchError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from sparsemem.files import DamagedFileError, as_path, atomic_write, read_json, require_local
from sparsemem.models.config import ModelConfig, from_hf_config, to_hf_config
from sparsemem.models.decoder import Decoder, Remat
from sparsemem.parallel.rules import Rules, named_sharding
from sparsemem.tokenizer import Tokenizer

# HF tensors that carry no weights of their own.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the model built from its config."""


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """How one of our parameters is stored in HF form.

    `hf_name` has a `{layer}` field for parameters stacked over layers. `kind`:
    `copy` (same layout), `linear` (HF `[out, in]` matrix; ours `[*in, *out]` with
    `in_dims` leading input axes) or `bias` (HF flat `[out]`; ours `[*out]`).
    """

    hf_name: str
    kind: str = "copy"
    in_dims: int = 1

    def to_ours(self, hf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.kind == "linear":
            return hf.T.reshape(shape)
        return hf.reshape(shape)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        if self.kind == "linear":
            rows = int(np.prod(ours.shape[:self.in_dims]))
            return np.ascontiguousarray(ours.reshape(rows, -1).T)
        if self.kind == "bias":
            return ours.reshape(-1)
        return ours

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.kind == "linear":
            rows = int(np.prod(shape[:self.in_dims]))
            return (int(np.prod(shape)) // rows, rows)
        if self.kind == "bias":
            return (int(np.prod(shape)),)
        return tuple(shape)


def tensor_maps(cfg: ModelConfig) -> dict[str, TensorMap]:
    """Our parameter path (dot-joined) -> its HF tensor, for `cfg`'s family."""
    layer = "model.layers.{layer}."
    maps = {
        "embed": TensorMap("model.embed_tokens.weight"),
        "final_norm": TensorMap("model.norm.weight"),
        "layers.attn_norm": TensorMap(layer + "input_layernorm.weight"),
        "layers.wq": TensorMap(layer + "self_attn.q_proj.weight", "linear"),
        "layers.wk": TensorMap(layer + "self_attn.k_proj.weight", "linear"),
        "layers.wv": TensorMap(layer + "self_attn.v_proj.weight", "linear"),
        "layers.wo": TensorMap(layer + "self_attn.o_proj.weight", "linear", in_dims=2),
        "layers.w_gate": TensorMap(layer + "mlp.gate_proj.weight", "linear"),
        "layers.w_up": TensorMap(layer + "mlp.up_proj.weight", "linear"),
        "layers.w_down": TensorMap(layer + "mlp.down_proj.weight", "linear"),
    }
    if cfg.post_norms:
        maps.update({
            "layers.attn_post_norm": TensorMap(layer + "post_attention_layernorm.weight"),
            "layers.mlp_norm": TensorMap(layer + "pre_feedforward_layernorm.weight"),
            "layers.mlp_post_norm": TensorMap(layer + "post_feedforward_layernorm.weight"),
        })
    else:
        maps["layers.mlp_norm"] = TensorMap(layer + "post_attention_layernorm.weight")
    if cfg.qkv_bias:
        maps.update({f"layers.b{p}": TensorMap(layer + f"self_attn.{p}_proj.bias", "bias") for p in "qkv"})
    if cfg.qk_norm:
        maps.update({f"layers.{p}_norm": TensorMap(layer + f"self_attn.{p}_norm.weight") for p in "qk"})
    if not cfg.tie_embeddings:
        maps["unembed"] = TensorMap("lm_head.weight")
    return maps


class SafetensorsFolder:
    """Lazy, name-addressed access to the tensors of a folder of `.safetensors` files."""

    def __init__(self, path: pathlib.Path):
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json(index, "re-download the model")["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"No *.safetensors files in {path}; expected a Hugging Face model folder")
        self._handles = {}
        self.location: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name in files:
            if not (path / name).exists():
                raise FileNotFoundError(f"{path / name} is listed in the index but missing; re-download the model")
            try:
                handle = safe_open(str(path / name), framework="numpy")
            except Exception as error:  # safetensors raises its own error types, none naming the file
                raise DamagedFileError(path / name, str(error), "re-download or re-export the model") from None
            self._handles[name] = handle
            for key in handle.keys():
                self.location[key] = name
                self.shapes[key] = tuple(handle.get_slice(key).get_shape())

    def get(self, name: str) -> np.ndarray:
        return self._handles[self.location[name]].get_tensor(name)


def _hf_names(tmap: TensorMap, cfg: ModelConfig) -> list[str]:
    if "{layer}" in tmap.hf_name:
        return [tmap.hf_name.format(layer=i) for i in range(cfg.num_layers)]
    return [tmap.hf_name]


def _strip_prefix(names: dict[str, tuple[int, ...]]) -> str:
    """The prefix before `model.embed_tokens.weight` (multimodal checkpoints nest the text model)."""
    for name in names:
        if name.endswith("model.embed_tokens.weight"):
            return name[: -len("model.embed_tokens.weight")]
    return ""


def _check(cfg: ModelConfig, params: dict[str, jax.ShapeDtypeStruct], folder: SafetensorsFolder,
           prefix: str) -> None:
    maps = tensor_maps(cfg)
    missing, misshaped, expected = [], [], set()
    for path, abstract in params.items():
        tmap = maps[path]
        per_layer = abstract.shape[1:] if "{layer}" in tmap.hf_name else abstract.shape
        want = tmap.hf_shape(tuple(per_layer))
        for name in _hf_names(tmap, cfg):
            expected.add(prefix + name)
            got = folder.shapes.get(prefix + name)
            if got is None:
                missing.append(prefix + name)
            elif tuple(got) != want:
                misshaped.append(f"{prefix + name}: checkpoint {tuple(got)} vs model {want}")
    unexpected = [n for n in folder.shapes if n not in expected and not _IGNORED.search(n)
                  and not (cfg.tie_embeddings and n.endswith("lm_head.weight"))]
    if missing or misshaped or unexpected:
        parts = []
        for title, items in (("missing", missing), ("mis-shaped", misshaped), ("unexpected", unexpected)):
            if items:
                shown = "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
                parts.append(f"  {len(items)} {title}:\n    {shown}")
        raise CheckpointMismatchError(
            f"Checkpoint does not match its config ({cfg.family}, {cfg.num_layers} layers):\n" + "\n".join(parts)
            + "\nCheck that config.json belongs to these weights and that the download is complete.")


def _flat_params(state: nnx.State) -> Iterator[tuple[str, nnx.Variable]]:
    for path, var in nnx.to_flat_state(state):
        yield ".".join(str(p) for p in path), var


def read_config(path: str | os.PathLike) -> ModelConfig:
    path = require_local(path, "model folder", "copy it to local disk first (launch/stage.sh does so on every worker)")
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found; a model folder needs config.json and *.safetensors")
    hf = read_json(config_file, "re-download the model's config.json")
    if "sparsemem" in hf:
        raise ValueError(f"{path} is a compacted sparsemem backbone (written by `sparsemem export`), not a Hugging "
                         "Face model folder; serve it with `sparsemem generate --run <run or export folder>`")
    return from_hf_config(hf)


def load_hf_checkpoint(path: str | os.PathLike, *, mesh: Mesh | None = None, rules: Rules | None = None,
                       param_dtype=jnp.float32, dtype=jnp.float32, remat: Remat = "none") -> Decoder:
    """Build a `Decoder` from a HF folder, each parameter placed directly with its sharding."""
    path = pathlib.Path(path)
    cfg = read_config(path)
    folder = SafetensorsFolder(path)
    prefix = _strip_prefix(folder.shapes)
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=dtype,
                                              remat=remat))
    graphdef, state = nnx.split(abstract)
    params = dict(_flat_params(state))
    _check(cfg, {k: v.get_value() for k, v in params.items()}, folder, prefix)
    maps = tensor_maps(cfg)
    device = SingleDeviceSharding(jax.devices()[0])
    for name, var in params.items():
        tmap, shape = maps[name], tuple(var.shape)
        if "{layer}" in tmap.hf_name:
            host = np.stack([tmap.to_ours(folder.get(prefix + n), shape[1:]) for n in _hf_names(tmap, cfg)])
        else:
            host = tmap.to_ours(folder.get(prefix + tmap.hf_name), shape)
        host = host.astype(var.dtype)
        sharding = named_sharding(mesh, var.get_metadata()["logical_axes"], shape, rules) if mesh else device
        var.set_value(jax.make_array_from_callback(shape, sharding, lambda index, h=host: h[index]))
    return nnx.merge(graphdef, state)


def save_hf_checkpoint(model: Decoder, path: str | os.PathLike) -> None:
    """Write `config.json` and `model.safetensors` in HF layout (exact inverse of the loader), locally or to `gs://`."""
    path = as_path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    maps = tensor_maps(cfg)
    tensors: dict[str, np.ndarray] = {}
    for name, var in _flat_params(nnx.state(model, nnx.Param)):
        tmap, value = maps[name], np.asarray(jax.device_get(var[...]))
        if "{layer}" in tmap.hf_name:
            for i, hf_name in enumerate(_hf_names(tmap, cfg)):
                tensors[hf_name] = tmap.to_hf(value[i])
        else:
            tensors[tmap.hf_name] = tmap.to_hf(value)
    atomic_write(path / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write(path / "config.json", lambda tmp: tmp.write_text(json.dumps(to_hf_config(cfg), indent=2)))


def load_tokenizer(path: str | os.PathLike, cfg: ModelConfig) -> Tokenizer:
    """The folder's `tokenizer.json`; Llama and Gemma prepend BOS, Qwen does not."""
    bos = cfg.bos_id if cfg.family in ("llama", "gemma3") else None
    return Tokenizer(pathlib.Path(path) / "tokenizer.json", bos_id=bos, eos_id=cfg.eos_id, pad_id=cfg.pad_id)
