"""End to end: `sparsemem run --config experiments/configs/ci.py`, resume, refusal, report and notebook."""

import json
import os
import pathlib
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from sparsemem import cli
from sparsemem.experiment.config import trains_gates
from sparsemem.experiment.metrics import read_metrics

ROOT = pathlib.Path(__file__).parent.parent
CI = str(ROOT / "experiments" / "configs" / "ci.py")
STEPS = 4
VARIANTS = ("koff", "koff_importance", "prune_only", "prune_then_memory", "lora_only", "kv_only", "dense_memory",
            "random_mask", "random_mask_memory", "score_mask", "score_mask_memory")
NOTHING_TO_TRAIN = ("random_mask", "score_mask")  # a fixed mask and no memory

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory, demo_folder):
    workdir = tmp_path_factory.mktemp("runs") / "ci"
    assert cli.main(["run", "--config", CI, "--workdir", str(workdir)]) == 0
    return workdir


def test_run_writes_every_artefact(ci_run):
    config = json.loads((ci_run / "config.json").read_text())
    assert config["train"]["steps"] == STEPS
    metrics = read_metrics(ci_run)
    for variant in VARIANTS:
        steps = 0 if variant in NOTHING_TO_TRAIN else STEPS  # joint training: every step
        assert [m["step"] for m in metrics if m["variant"] == variant] == list(range(1, steps + 1))
        assert bool(list((ci_run / "tensorboard" / variant).glob("events.out.tfevents.*"))) == (steps > 0)
        sparsity = json.loads((ci_run / "export" / variant / "sparsity.json").read_text())
        target = 0.0 if variant == "dense_memory" else config["koff"]["target_sparsity"]
        assert abs(sparsity["prunable"] - target) < 0.02
        with np.load(ci_run / "export" / variant / "mask.npz") as mask:
            assert set(mask) == {"head", "neuron"} and set(np.unique(mask["neuron"])) <= {0.0, 1.0}
        assert (ci_run / "export" / variant / "gates.npz").exists()
        if trains_gates(variant):  # the others train under a fixed mask
            gap = json.loads((ci_run / "export" / variant / "controller.json").read_text())
            assert np.isclose(gap["gap"], gap["sampled"] - gap["deterministic"]) and gap["deterministic"] > 0
    with np.load(ci_run / "export" / "koff" / "memory" / "de.npz") as memory:
        assert memory["k"].shape == (2, config["koff"]["memory_slots"], 2, 8)  # [L, M, Hkv, Dh]
        assert memory["q_a"].shape == (2, 32, config["koff"]["lora_rank"])
    assert not (ci_run / "export" / "prune_only" / "memory").exists()
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE((ci_run / "export" / "koff" / "mask.npz").stat().st_mode) == 0o666 & ~umask
    assert set(p.name for p in (ci_run / "export" / "lora_only" / "memory").iterdir()) == {"en-US.npz", "de.npz"}

    results = json.loads((ci_run / "eval.json").read_text())
    assert list(results["perplexity"]) == ["dense", "dense_memory", "pruned", "pruned_retrained", "pruned_lora",
                                           "pruned_kv", "prune_then_memory", "koff", "koff_importance", "random_mask",
                                           "random_mask_memory", "score_mask", "score_mask_memory"]
    assert "(from KOFF)" not in results["settings"]["pruned_lora"]  # lora_only was trained on its own
    assert "trained unpruned" in results["settings"]["dense_memory"]
    pages, paragraphs = results["documents"], results["swap"]["documents"]
    assert len(pages["domain"]) == 2 * config["eval"]["documents"]  # whole pages for perplexity ...
    assert np.mean(pages["tokens"]) > 3 * np.mean(paragraphs["tokens"])  # ... much longer than paragraphs
    for name, losses in results["document_loss"].items():
        assert len(losses["loss"]) == len(pages["domain"])
        assert results["loss_after_first"][name]["mean"] < results["loss"][name]["mean"] + 1.0
        assert results["position_loss"][name]["offsets"][0] == "0"
    swap = np.array(results["swap"]["perplexity"])
    assert swap.shape == (2, 2) and np.array(results["swap"]["document_loss"]).shape == (2, len(paragraphs["domain"]))
    assert (ci_run / "baselines" / "random_mask.npz").exists() and (ci_run / "baselines" / "score_mask.npz").exists()
    assert set(results["mc"]) == {"continuation", "translation"}
    for task, by_setting in results["mc"].items():
        assert set(by_setting) == set(config["eval"]["mc_settings"])
        assert all(0.0 <= by_setting[s]["mean"] <= 1.0 for s in by_setting)
    assert np.isnan(results["mc"]["translation"]["dense"]["en-US"])  # translations go from en-US into de

    analysis = json.loads((ci_run / "analysis.json").read_text())
    assert set(analysis["tests"]) == set(VARIANTS)
    assert set(analysis["tests"]["koff"]) == {"specific", "general"}
    assert min(analysis["tokens"].values()) >= config["analysis"]["tokens"]
    report = (ci_run / "report.md").read_text()
    for heading in ("## The paper's claims", "## Sparsity", "## Training", "## Sparsity controller",
                    "## Held-out perplexity", "## Across seeds (2 seeds", "## Memory swap", "## Multiple choice",
                    "## Language-specific"):
        assert heading in report
    for claim in ("pruning degrades the model (KOFF's mask, no memories)",
                  "KOFF's memories recover most of its mask's pruning gap", "LoRA + KV beats LoRA alone",
                  "joint training beats prune-then-memory (same steps)", "KOFF beats a random mask with memories",
                  "KOFF (importance gate start) beats the Taylor-score mask + memories",
                  "a mask learned without memories beats the Taylor-score mask", "own memory beats",
                  "multiple choice (continuation)", "language-general neurons are preferentially kept",
                  "Holm-adjusted over the", "2 seeds x documents"):
        assert claim in report
    assert "**reproduces**" in report or "**inconclusive**" in report or "**contradicts**" in report
    assert (ci_run / "seeds" / "1" / "eval.json").exists()
    assert json.loads((ci_run / "seeds" / "1" / "config.json").read_text())["data"]["seed"] == 1
    for png in ("training", "controller", "sparsity_per_layer", "swap", "lape", "positions"):
        assert (ci_run / "plots" / f"{png}.png").stat().st_size > 1000
        assert f"plots/{png}.png" in report


def test_rerun_resumes_without_retraining(ci_run):
    lines = (ci_run / "metrics.jsonl").read_text()
    eval_before = (ci_run / "eval.json").read_text()
    assert cli.main(["run", "--config", CI, "--workdir", str(ci_run)]) == 0
    assert (ci_run / "metrics.jsonl").read_text() == lines
    assert (ci_run / "eval.json").read_text() == eval_before


def test_interrupted_training_resumes_to_the_same_result(ci_run, tmp_path):
    """Drop the koff variant's final checkpoint and export: the rerun trains the last steps again, identically."""
    resumed = tmp_path / "ci"
    shutil.copytree(ci_run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "koff" / str(STEPS))
    shutil.rmtree(resumed / "export" / "koff")
    assert cli.main(["run", "--config", CI, "--workdir", str(resumed)]) == 0
    for name in ("mask.npz", "memory/de.npz"):
        with np.load(ci_run / "export" / "koff" / name) as a, np.load(resumed / "export" / "koff" / name) as b:
            for key in a:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)
    lines = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if m["variant"] == "koff"][-2:] == [STEPS - 1, STEPS]
    assert len([m for m in lines if m["variant"] == "koff"]) == STEPS + 2  # two steps logged twice


def test_a_different_config_is_refused_before_any_work(ci_run, capsys):
    assert cli.main(["run", "--config", CI, "--workdir", str(ci_run), "--set", "koff.target_sparsity=0.1"]) == 1
    assert "different config (koff.target_sparsity: 0.25 -> 0.1)" in capsys.readouterr().err


def test_unknown_override_is_refused_naming_the_key(tmp_path, capsys):
    assert cli.main(["run", "--config", CI, "--workdir", str(tmp_path / "x"), "--set", "koff.sparsity=0.1"]) == 1
    assert "unknown config key(s) ['koff.sparsity']" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_notebook_renders_the_run(ci_run, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("RUN_DIRS", str(ci_run))
    monkeypatch.setenv("SPARSEMEM_ROOT", "/")
    notebook = nbformat.read(ROOT / "notebooks" / "01_results.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    text = json.dumps([o.get("data", {}).get("text/markdown", "") for o in outputs])
    assert "pruned + LoRA + KV memory (KOFF)" in text and "memory en-US" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 5


def test_analyze_recomputes_the_analysis_of_a_finished_run(ci_run, tmp_path):
    copy = tmp_path / "ci"
    shutil.copytree(ci_run, copy)
    (copy / "analysis.json").unlink()
    (copy / "report.md").write_text("")
    assert cli.main(["analyze", "--workdir", str(copy)]) == 0
    assert json.loads((copy / "analysis.json").read_text()) == json.loads((ci_run / "analysis.json").read_text())
    assert "## Language-specific and language-general neurons" in (copy / "report.md").read_text()


def test_compare_tabulates_finished_runs_and_refuses_unfinished_ones(ci_run, tmp_path, capsys):
    out = tmp_path / "compare.md"
    assert cli.main(["compare", str(ci_run), str(ci_run), "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ci |")]
    results = json.loads((ci_run / "eval.json").read_text())
    assert len(rows) == 2 and " +- " in rows[0]  # two seeds: mean +- sd
    seeds = [results, json.loads((ci_run / "seeds" / "1" / "eval.json").read_text())]
    assert f"{np.mean([r['perplexity']['koff']['mean'] for r in seeds]):.3f} +- " in rows[0]
    assert rows[0].endswith("| reference |") and rows[1].endswith("| +0.000 [+0.000, +0.000] (2 seeds) |")  # paired by seed
    assert out.read_text() in capsys.readouterr().out + "\n"
    assert cli.main(["compare", str(ci_run), str(ci_run), "--paired", "pruned", "--paired", "koff",
                     "--out", str(out)]) == 0
    header = out.read_text().splitlines()[0]
    assert header.endswith(f"| {results['settings']['pruned']} loss - first run [95% CI] | "
                           f"{results['settings']['koff']} loss - first run [95% CI] |")
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ci |")]
    assert rows[0].endswith("| reference | reference |")
    assert rows[1].endswith("| +0.000 [+0.000, +0.000] (2 seeds) | +0.000 [+0.000, +0.000] (2 seeds) |")
    (tmp_path / "unfinished").mkdir()
    shutil.copy(ci_run / "config.json", tmp_path / "unfinished" / "config.json")
    with pytest.raises(SystemExit, match="no eval.json"):
        cli.main(["compare", str(ci_run), str(tmp_path / "unfinished")])


def _assert_close(a, b, path=""):
    """Nested JSON values equal, numbers within float tolerance (NaN equals NaN)."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            _assert_close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list) and a and not isinstance(a[0], (int, float)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, (int, float, list)) and not isinstance(a, bool):
        np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-6, err_msg=path)
    else:
        assert a == b, path


def _truncate(path: pathlib.Path) -> bytes:
    damaged = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(damaged)
    return damaged


def test_every_damaged_file_is_recovered_or_named_and_nothing_is_overwritten(ci_run, tmp_path, capsys):
    """Truncate each kind of file a run writes; the rerun recovers and sets the damaged files aside."""
    run = tmp_path / "ci"
    shutil.copytree(ci_run, run)
    newest = run / "checkpoints" / "koff" / str(STEPS)
    for path in (newest / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            _truncate(path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"variant": "koff", "st')  # killed during a write
    damaged = {name: _truncate(run / name) for name in ("eval.json", "analysis.json", "timing.json")}
    for name in ("mask.npz", "memory/de.npz"):
        _truncate(run / "export" / "koff" / name)

    assert cli.main(["run", "--config", CI, "--workdir", str(run)]) == 0
    for name in ("eval.json", "analysis.json"):
        _assert_close(json.loads((run / name).read_text()), json.loads((ci_run / name).read_text()))
    for name, data in damaged.items():
        assert (run / f"{name}.damaged").read_bytes() == data  # set aside, not overwritten
    assert (run / "checkpoints" / f"koff.damaged-step-{STEPS}").is_dir()
    assert [m["step"] for m in read_metrics(run) if m["variant"] == "koff"] == list(range(1, STEPS + 1))
    for name in ("mask.npz", "memory/de.npz"):
        with np.load(run / "export" / "koff" / name) as redone, np.load(ci_run / "export" / "koff" / name) as ref:
            for key in ref:
                np.testing.assert_array_equal(redone[key], ref[key])

    _truncate(run / "export" / "koff" / "mask.npz")
    assert cli.main(["analyze", "--workdir", str(run)]) == 1
    assert f"{run / 'export' / 'koff' / 'mask.npz'} is damaged" in capsys.readouterr().err
    _truncate(run / "eval.json")
    assert cli.main(["compare", str(run)]) == 1
    assert f"{run / 'eval.json'} is damaged" in capsys.readouterr().err
    _truncate(run / "config.json")
    assert cli.main(["run", "--config", CI, "--workdir", str(run)]) == 1
    err = capsys.readouterr().err
    assert f"{run / 'config.json'} is damaged" in err and "restore it from a copy" in err


def test_sigterm_saves_a_checkpoint_and_exits_75(tmp_path):
    """A wrapper tells a preempted run (75) from a finished one (0) or an error (1)."""
    workdir = tmp_path / "preempted"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(
        [sys.executable, "-m", "sparsemem.cli", "run", "--config", CI, "--workdir", str(workdir),
         "--set", "train.steps=2000", "--set", "train.variants=('koff',)", "--set", "train.save_every=0"],
        env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not read_metrics(workdir) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 75, err[-2000:]
    assert "rerun the same command to resume" in err
    last = max(m["step"] for m in read_metrics(workdir))
    assert (workdir / "checkpoints" / "koff" / str(last)).is_dir()
