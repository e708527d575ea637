"""Each model family of the paper configs through the whole pipeline: run -> export -> serve -> extend -> route.

A tiny random-weight model of each family (Llama-3.1 with GQA and llama3 RoPE scaling,
untied; Qwen2.5 with its q/k/v biases, tied; Gemma-3 with local and global layers) is
saved as a Hugging Face folder with a word-level tokenizer, trained by `sparsemem run`
on a two-domain text folder, exported, served over HTTP (one request), extended by a
third domain and routed, so a family-specific bug after training shows up here.
"""

import asyncio
import json
import math
import pathlib

import aiohttp
import numpy as np
import pytest

from sparsemem import cli
from sparsemem.models.config import from_hf_config, preset
from sparsemem.serve.deploy import Deployment
from sparsemem.serve.generate import SamplingConfig
from sparsemem.serve.scheduler import ContinuousScheduler, ServedModel
from sparsemem.serve.server import BackgroundServer, create_app
from test_serve_compact import random_decoder
from test_serve_export import save_model_folder
from test_serve_http import post, reference

CI = str(pathlib.Path(__file__).parent.parent / "experiments" / "configs" / "ci.py")
SHAPE = dict(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64, vocab_size=160, bos_id=1,
             eos_id=2, pad_id=0)
FAMILIES = {"llama": preset("llama-3.1-8b").replace(**SHAPE),
            "qwen2": preset("qwen2.5-3b").replace(**SHAPE),
            "gemma3": preset("gemma-3-270m").replace(**SHAPE, sliding_window=16, layer_types=("local", "global"))}
WORDS = {"alpha": range(10, 70), "beta": range(70, 130), "gamma": range(130, 160)}  # each domain its own words
SETTINGS = ["train.variants=('koff',)", "train.seeds=1", "train.steps=2", "train.save_every=2", "train.log_every=1",
            "koff.lora_targets=('q','k','v','o','gate','up','down')", "analysis.enabled=False",
            "eval.mc_questions=0", "eval.documents=4", "eval.paragraphs=4", "eval.seq_len=128", "eval.context=32"]
PROMPT = "w10 w11 w12 w13 w14"


def write_domain(path: pathlib.Path, words: range, documents: int = 48, seed: int = 0) -> pathlib.Path:
    """`documents` text files of 40-80 words drawn (Zipf-like) from `words` only."""
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(words) + 1)
    for i in range(documents):
        ids = rng.choice(np.asarray(words), size=rng.integers(40, 80), p=weights / weights.sum())
        (path / f"doc{i:03d}.txt").write_text(" ".join(f"w{j}" for j in ids))
    return path


@pytest.fixture(scope="module", params=list(FAMILIES))
def pipeline(request, tmp_path_factory):
    """A family's run after `run`, `export` and `extend` (the served answer is checked between the last two)."""
    cfg = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    save_model_folder(random_decoder(cfg), root / "model")
    for seed, name in enumerate(("alpha", "beta")):
        write_domain(root / "corpus" / name, WORDS[name], seed=seed)
    extra = write_domain(root / "gamma", WORDS["gamma"], seed=2)
    overrides = SETTINGS + ["model.source=hf", f"model.path={root / 'model'}", "data.corpus=folder",
                            f"data.folder={root / 'corpus'}", f"data.data_dir={root / 'tfds'}"]
    run = root / "run"
    assert cli.main(["run", "--config", CI, "--workdir", str(run), *[a for o in overrides for a in ("--set", o)]]) == 0
    assert cli.main(["export", "--run", str(run)]) == 0
    served = served_answer(run / "export" / "koff" / "serve")
    assert cli.main(["extend", "--run", str(run), "--folder", f"gamma={extra}", "--steps", "2"]) == 0
    assert cli.main(["route", "--run", str(run), "--documents", "4", "--lengths", "8,16", "--ppl-prompt", "8",
                     "--continuation", "16", "--batch-size", "4"]) == 0
    return cfg, run, served


def served_answer(export: pathlib.Path) -> tuple[str, str]:
    """One greedy completion request to the HTTP server of `export`, and what `generate` gives for it."""
    model = ServedModel.from_export(export)
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 6, "temperature": 0}

    async def ask(url):
        async with aiohttp.ClientSession() as session:
            return await post(session, url, body)

    with BackgroundServer(create_app(ContinuousScheduler(model, context=64, max_batch=2, max_queue=4),
                                     context=64)) as server:
        status, answer = asyncio.run(ask(server.url))
    assert status == 200, answer
    return answer["choices"][0]["text"], reference(model, PROMPT, "alpha", SamplingConfig(max_new_tokens=6))


def test_run_trains_to_the_target_and_export_keeps_the_architecture(pipeline):
    cfg, run, _ = pipeline
    config = json.loads((run / "config.json").read_text())
    realised = json.loads((run / "export" / "koff" / "sparsity.json").read_text())["prunable"]
    assert abs(realised - config["koff"]["target_sparsity"]) < 0.05
    backbone = from_hf_config(json.loads((run / "export" / "koff" / "serve" / "backbone" / "config.json").read_text()))
    assert (backbone.family, backbone.rope_scaling, backbone.qkv_bias, backbone.tie_embeddings, backbone.layer_types) \
        == (cfg.family, cfg.rope_scaling, cfg.qkv_bias, cfg.tie_embeddings, cfg.layer_types)


def test_server_answers_as_generate_does(pipeline):
    text, expected = pipeline[2]
    assert text == expected and text.split()


def test_extended_domain_is_served_and_routed(pipeline):
    _, run, _ = pipeline
    assert Deployment.load(run / "export" / "koff" / "serve").domains == ("alpha", "beta", "gamma")
    routed = json.loads((run / "route.json").read_text())
    assert routed["domains"] == ["alpha", "beta", "gamma"]
    for kind, by_domain in routed["perplexity"].items():
        assert all(math.isfinite(p) and p > 1 for p in by_domain.values()), kind
    assert all(0 <= a <= 1 for by_length in routed["accuracy"].values() for a in by_length["16"].values())
