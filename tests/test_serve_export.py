"""Export -> load -> generate equals generating from the run; fingerprints refuse foreign modules; LoRA merge; CLI."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers

from sparsemem import cli
from sparsemem.checkpoints.hf import load_tokenizer, save_hf_checkpoint
from sparsemem.checkpoints.memory_module import ModuleMismatchError, load_memory_module
from sparsemem.checkpoints.run_state import RunCheckpointer
from sparsemem.koff.memory import hooks_from_rows
from sparsemem.models.hooks import Hooks
from sparsemem.serve.deploy import Deployment
from sparsemem.serve.export_folder import export
from sparsemem.serve.generate import SamplingConfig, generate_ids
from sparsemem.serve.memory import UnknownDomainError
from test_serve_compact import DOMAINS, hard_masks, random_decoder, random_table, tiny

PROMPTS = [[2, 5, 9, 11, 40, 7, 3], [2, 8], [2, 17, 33, 4]]
NAMES = ["de", "en", "de"]
GREEDY = SamplingConfig(max_new_tokens=6)
SCALE = 0.7


def run_generate(decoder, masks, table, names, prompts=PROMPTS, sampling=GREEDY):
    """Generation from the run itself: the masked `Decoder` with each row's memory through `Hooks`."""
    ids = jnp.asarray([DOMAINS.index(n) for n in names])
    memory = hooks_from_rows({k: jnp.asarray(v) for k, v in table.items()}, ids, SCALE)
    hooks = Hooks(head_scale=jnp.asarray(masks["head"]), neuron_scale=jnp.asarray(masks["neuron"]),
                  memory_k=memory.memory_k, memory_v=memory.memory_v, lora=memory.lora)
    return generate_ids(decoder, prompts, sampling, hooks=hooks, pad_id=decoder.cfg.pad_id,
                        eos_id=decoder.cfg.eos_id)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cfg = tiny("gemma3")
    decoder, masks, table = random_decoder(cfg), hard_masks(cfg), random_table(cfg)
    out = export(decoder, masks, table, DOMAINS, SCALE, tmp_path_factory.mktemp("export"))
    return decoder, masks, table, out


def test_export_load_generate_equals_run(exported):
    decoder, masks, table, out = exported
    deployment = Deployment.load(out)
    assert deployment.domains == ("de", "en", "fr")  # sorted module folders
    widths = json.loads((out / "backbone" / "config.json").read_text())["sparsemem"]["widths"]
    assert [w["heads"] for w in widths] == [2, 0, 3] and [w["kv_heads"] for w in widths] == [1, 0, 2]
    manifest = json.loads((out / "modules" / "de" / "manifest.json").read_text())
    assert manifest["domain"] == "de" and manifest["shapes"]["k"] == [3, 3, 2, 16]
    assert deployment.generate_ids(PROMPTS, NAMES, GREEDY) == run_generate(decoder, masks, table, NAMES)
    with pytest.raises(UnknownDomainError, match="known domains: de, en, fr"):
        deployment.generate_ids(PROMPTS[:1], ["it"], GREEDY)


def test_module_for_another_backbone_is_refused(exported, tmp_path):
    decoder, masks, table, out = exported
    other_model = export(random_decoder(decoder.cfg, seed=5), masks, table, DOMAINS, SCALE, tmp_path / "model")
    other_mask = {**masks, "neuron": 1 - masks["neuron"]}
    other_mask = export(decoder, other_mask, table, DOMAINS, SCALE, tmp_path / "mask")
    backbone = json.loads((out / "backbone" / "config.json").read_text())["sparsemem"]
    with pytest.raises(ModuleMismatchError, match="base model fingerprint .* \\(backbone: "
                                                  + backbone["base_fingerprint"]):
        load_memory_module(other_model / "modules" / "de", base_fingerprint=backbone["base_fingerprint"],
                           mask_fingerprint=backbone["mask_fingerprint"])
    # A foreign module dropped into the export folder makes loading fail, naming the mask mismatch.
    (out / "modules" / "xx").mkdir()
    for name in ("manifest.json", "memory.safetensors"):
        (out / "modules" / "xx" / name).write_bytes((other_mask / "modules" / "fr" / name).read_bytes())
    try:
        with pytest.raises(ModuleMismatchError, match="'fr' .* mask fingerprint"):
            Deployment.load(out)
    finally:
        for name in ("manifest.json", "memory.safetensors"):
            (out / "modules" / "xx" / name).unlink()
        (out / "modules" / "xx").rmdir()


def test_merged_lora_backbone_serves_its_domain(exported, tmp_path):
    decoder, masks, table, out = exported
    merged = Deployment.load(export(decoder, masks, table, DOMAINS, SCALE, tmp_path, merge_domain="fr"))
    assert merged.domains == ("fr",)
    assert merged.generate_ids(PROMPTS, ["fr"] * 3, GREEDY) == run_generate(decoder, masks, table, ["fr"] * 3)
    with pytest.raises(UnknownDomainError, match="known domains: fr"):
        merged.generate_ids(PROMPTS[:1], ["de"], GREEDY)


def save_model_folder(decoder, folder):
    """`decoder` as a HF model folder with a word-level tokenizer: token i is the word `w{i}`."""
    save_hf_checkpoint(decoder, folder)
    vocab = {f"w{i}": i for i in range(decoder.cfg.vocab_size)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(folder / "tokenizer.json"))


def _tiny_run(tmp_path, decoder, masks, table):
    """A `sparsemem run` directory as the experiment writes it, for a tiny HF-folder model."""
    from sparsemem.experiment.config import defaults
    from sparsemem.experiment.rundir import RunDir

    folder = tmp_path / "model"
    save_model_folder(decoder, folder)
    config = defaults()
    config.model.source, config.model.path = "hf", str(folder)
    config.koff.lora_alpha, config.koff.lora_rank = SCALE * 2, 2
    run = RunDir.prepare(tmp_path / "run", config)
    np.savez(run.file("export", "koff", "mask.npz"), **masks)
    for d, name in enumerate(DOMAINS):
        np.savez(run.file("export", "koff", "memory", f"{name}.npz"), **{k: v[d] for k, v in table.items()})
    return run.path


def test_cli_export_and_generate_from_run(exported, tmp_path, capsys):
    decoder, masks, table, _ = exported
    run = _tiny_run(tmp_path, decoder, masks, table)
    assert cli.main(["export", "--run", str(run)]) == 0
    capsys.readouterr()
    prompt = "w5 w9 w11 w40"
    assert cli.main(["generate", "--run", str(run), "--domain", "de", "--max-new-tokens", "5", "--temperature",
                     "1", "--seed", "3", "--prompt", prompt]) == 0
    printed = capsys.readouterr().out.strip()
    tokenizer = load_tokenizer(tmp_path / "model", decoder.cfg)
    sampling = SamplingConfig(max_new_tokens=5, temperature=1.0, seed=3)
    want = run_generate(decoder, masks, table, ["de"], [tokenizer.encode(prompt)], sampling)[0]
    assert printed == prompt + tokenizer.decode(want)
    with pytest.raises(SystemExit, match="error: unknown domain.*'nl'.*known domains: de, en, fr"):
        cli.main(["generate", "--run", str(run), "--domain", "nl", "--prompt", prompt])


def test_cli_rounded_export_keeps_best_scored_units(exported, tmp_path):
    decoder, masks, table, _ = exported
    run = _tiny_run(tmp_path, decoder, masks, table)
    scores = np.random.default_rng(0).normal(size=masks["neuron"].shape).astype(np.float32)
    checkpointer = RunCheckpointer(run / "checkpoints" / "koff")
    checkpointer.save(7, {"gates": {"head": np.zeros_like(masks["head"]), "neuron": scores}})
    checkpointer.close()
    assert cli.main(["export", "--run", str(run), "--round-to", "32", "--out", str(tmp_path / "r")]) == 0
    layout = json.loads((tmp_path / "r" / "backbone" / "config.json").read_text())["sparsemem"]["layout"]
    for layer, kept in enumerate(layout["neurons"]):
        assert len(kept) % 32 == 0 and set(np.flatnonzero(masks["neuron"][layer])) <= set(kept)
        added = sorted(set(kept) - set(np.flatnonzero(masks["neuron"][layer])))
        dropped = sorted(set(range(masks["neuron"].shape[1])) - set(kept))
        if added and dropped:
            assert scores[layer, added].min() > scores[layer, dropped].max()
    assert Deployment.load(tmp_path / "r").generate_ids(PROMPTS, NAMES, GREEDY)


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"memory.safetensors is damaged or truncated \(SHA-256 .* the file changed after export\)"),
    ("truncate-undigested", r"memory.safetensors is damaged or not a safetensors file"),
    ("foreign", r"manifest.json has format None, expected 'sparsemem-memory-module/1': not a sparsemem memory"),
    ("garbled", r"manifest.json is damaged or truncated"),
])
def test_damaged_module_file_is_refused_in_one_line(exported, tmp_path, damage, message):
    """A truncated weights file (with or without a recorded digest), another program's manifest, or a cut
    manifest: one line naming the file."""
    _, _, _, out = exported
    module = tmp_path / "de"
    module.mkdir()
    for name in ("manifest.json", "memory.safetensors"):
        (module / name).write_bytes((out / "modules" / "de" / name).read_bytes())
    weights, manifest = module / "memory.safetensors", module / "manifest.json"
    if damage.startswith("truncate"):
        weights.write_bytes(weights.read_bytes()[:-100])
        if damage == "truncate-undigested":  # an export from before digests: safetensors finds the damage
            manifest.write_text(json.dumps({k: v for k, v in json.loads(manifest.read_text()).items()
                                            if k != "sha256"}))
    elif damage == "foreign":
        manifest.write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    else:
        manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(ModuleMismatchError, match=message) as error:
        load_memory_module(module)
    assert "\n" not in str(error.value) and str(module) in str(error.value)


def test_export_writes_every_file_through_a_rename(exported, tmp_path, monkeypatch):
    """Every file of an export appears by a rename of a finished temporary file (a crash leaves old or new, never
    half a file)."""
    import os

    decoder, masks, table, _ = exported
    out = tmp_path / "export"
    renamed, real_replace = set(), os.replace

    def spy(source, target, *args, **kwargs):
        renamed.add(os.fspath(target))
        return real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", spy)
    export(decoder, masks, table, DOMAINS, SCALE, out)
    written = {os.fspath(p) for p in out.rglob("*") if p.is_file()}
    assert len(written) >= 8 and written <= renamed, written - renamed


@pytest.mark.parametrize("name", ["modules/fr/memory.safetensors", "backbone/model.safetensors"])
def test_one_changed_byte_is_refused_naming_the_file(exported, tmp_path, name):
    """Every exported file's SHA-256 is recorded at export and checked before loading."""
    _, _, _, out = exported
    copy = tmp_path / "copy"
    for p in out.rglob("*"):
        if p.is_file():
            (copy / p.relative_to(out)).parent.mkdir(parents=True, exist_ok=True)
            (copy / p.relative_to(out)).write_bytes(p.read_bytes())
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 1
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="changed after export") as error:
        Deployment.load(copy)
    assert str(copy / name) in str(error.value) and "\n" not in str(error.value)
