"""`gs://` run directories and model folders, against a local stand-in for the object store (tests/fake_gcs.py)."""

import json
import logging
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from sparsemem import cli, files
from sparsemem.checkpoints.hf import load_hf_checkpoint, save_hf_checkpoint
from sparsemem.experiment.config import load_config
from sparsemem.experiment.metrics import MetricsLog, read_metrics
from sparsemem.experiment.rundir import LOCK, MARKER, RunDir
from sparsemem.models.config import preset
from sparsemem.models.decoder import Decoder
from tests.fake_gcs import fake_gcs  # noqa: F401 (fixture)

ROOT = pathlib.Path(__file__).parent.parent
CI = str(ROOT / "experiments" / "configs" / "ci.py")
STEP = {"loss": 1.0, "expected_sparsity": 0.1, "target": 0.1, "tokens_per_s": 1.0, "loss_by_domain": {0: 1.0}}


def test_a_run_directory_on_the_object_store_is_made_there_not_in_a_local_gs_folder(fake_gcs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(CI)
    with RunDir("gs://bucket/runs/ci").open(config) as run:
        assert str(run.path) == "gs://bucket/runs/ci"
        run.write_json("eval.json", {"x": 1})
        assert (fake_gcs / "bucket/runs/ci" / LOCK).read_text().startswith("host ")
    stored = fake_gcs / "bucket" / "runs" / "ci"
    assert sorted(p.name for p in stored.iterdir()) == [MARKER, "config.json", "eval.json"]  # lock object removed
    assert RunDir("gs://bucket/runs/ci").read_json("eval.json") == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # nothing under the working directory


def test_a_left_lock_object_warns_naming_its_holder_and_does_not_block_a_resume(fake_gcs, caplog):
    config = load_config(CI)
    RunDir.prepare("gs://bucket/runs/ci", config)
    (fake_gcs / "bucket/runs/ci" / LOCK).write_text("host worker-0 pid 7 since 2025-01-01 00:00:00\n")  # a preempted run
    with caplog.at_level(logging.WARNING), RunDir.check("gs://bucket/runs/ci", config).open(config):
        pass
    assert "host worker-0 pid 7" in caplog.text and "no lock that excludes" in caplog.text


def test_metrics_are_staged_locally_uploaded_and_appended_to_on_resume(fake_gcs):
    run = files.as_path("gs://bucket/runs/ci")
    for first, last in ((0, 2), (2, 3)):  # a run, then its resume
        metrics = MetricsLog(run, "koff", ["en-US"], total_steps=3, first_step=first, log_every=2)
        for step in range(first + 1, last + 1):
            metrics(step, STEP)
        if first == 0:
            assert [m["step"] for m in read_metrics(run)] == [1, 2]  # uploaded at step 2 (log_every), before close
        metrics.close()
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]
    events = list((fake_gcs / "bucket/runs/ci/tensorboard/koff").glob("events.out.tfevents.*"))
    assert len(events) == 2 and all(e.stat().st_size > 0 for e in events)


def test_a_gs_model_folder_is_staged_once_and_loads_the_same_weights(fake_gcs, tmp_path):
    cfg = preset("llama-3.2-1b").replace(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                                         vocab_size=64)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    save_hf_checkpoint(model, "gs://bucket/models/tiny")
    local = files.local_copy("gs://bucket/models/tiny", tmp_path / "cache")
    assert sorted(p.name for p in local.iterdir()) == ["config.json", "model.safetensors"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in local.iterdir()}
    assert files.local_copy("gs://bucket/models/tiny", tmp_path / "cache") == local
    assert {p.name: p.stat().st_mtime_ns for p in local.iterdir()} == mtimes  # nothing copied again
    loaded = load_hf_checkpoint(local)
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(loaded, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_sparsemem_run_with_a_gs_workdir_writes_everything_to_the_bucket_and_resumes(fake_gcs, tmp_path, monkeypatch,
                                                                                   demo_folder):
    monkeypatch.chdir(tmp_path)
    workdir = "gs://bucket/runs/ci"
    assert cli.main(["run", "--config", CI, "--workdir", workdir, "--set", "train.variants=('koff',)"]) == 0
    stored = fake_gcs / "bucket" / "runs" / "ci"
    assert {MARKER, "config.json", "metrics.jsonl", "tensorboard", "checkpoints", "export", "eval.json",
            "analysis.json", "timing.json", "report.md", "plots"} <= {p.name for p in stored.iterdir()}
    assert not (stored / LOCK).exists()
    assert sorted(int(p.name) for p in (stored / "checkpoints" / "koff").iterdir() if p.name.isdigit()) == [2, 4]
    assert [m["step"] for m in read_metrics(workdir)] == [1, 2, 3, 4]
    assert (stored / "plots" / "training.png").stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no local "gs:" folder

    eval_json, metrics = (stored / "eval.json").read_text(), (stored / "metrics.jsonl").read_text()
    assert cli.main(["run", "--config", CI, "--workdir", workdir, "--set", "train.variants=('koff',)"]) == 0
    assert (stored / "eval.json").read_text() == eval_json and (stored / "metrics.jsonl").read_text() == metrics
    assert json.loads(eval_json)["perplexity"]["koff"]
