"""`sparsemem study`: cells per budget x seed, resumed cell by cell, one report with intervals over seeds."""

import json
import pathlib

import pytest

from sparsemem import cli
from sparsemem.experiment import study
from sparsemem.experiment.config import apply_overrides, load_config

ROOT = pathlib.Path(__file__).parent.parent
CI = str(ROOT / "experiments" / "configs" / "ci.py")
OVERRIDES = ["train.variants=('koff','koff_uniform','score_mask','score_mask_memory')", "koff.gate_init=importance",
             "study.budgets=(2, 1)", "train.seeds=2", "train.save_every=0", "eval.mc_questions=0",
             "eval.documents=2", "eval.paragraphs=2", "eval.resamples=400", "analysis.enabled=False"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory, demo_folder):
    workdir = tmp_path_factory.mktemp("study")
    args = ["study", "--config", CI, "--workdir", str(workdir)] + [f"--set={o}" for o in OVERRIDES]
    assert cli.main(args) == 0
    return workdir, args


def test_every_cell_runs_with_its_budget_and_seed(study_dir):
    workdir, _ = study_dir
    config = apply_overrides(load_config(CI), OVERRIDES)
    assert study.cells(config) == [(1, 0), (1, 1), (2, 0), (2, 1)]  # smallest budget first, every seed
    for steps, seed in study.cells(config):
        cell = json.loads((workdir / f"steps_{steps}" / f"seed_{seed}" / "config.json").read_text())
        assert cell["train"]["steps"] == steps and cell["train"]["seeds"] == 1
        assert cell["data"]["seed"] == config.data.seed + seed and cell["koff"]["seed"] == config.koff.seed + seed


def test_report_reads_every_budget_and_seed(study_dir):
    workdir, _ = study_dir
    summary = json.loads((workdir / "study.json").read_text())
    assert summary["budgets"] == [1, 2] and summary["seeds"] == 2
    for steps in ("1", "2"):
        assert set(summary["loss"][steps]) == {"dense", "dense_memory", "pruned", "pruned_lora", "pruned_kv", "koff",
                                               "koff_uniform", "score_mask", "score_mask_memory"}
    by_budget = {}
    for claim in summary["claims"]:
        by_budget.setdefault(claim["steps"], []).append(claim["claim"])
        assert claim["adjusted_p"] >= claim["interval"]["p_value"]  # Holm over the whole family
    assert by_budget[1] == by_budget[2]
    assert "KOFF (uniform gate start) beats the Taylor-score mask + memories" in by_budget[1]
    text = (workdir / "study.md").read_text()
    assert "Finished budgets: [1, 2]" in text and "2 seeds" in text
    assert (workdir / "plots" / "budget.png").stat().st_size > 10_000


def test_a_finished_cell_is_never_run_again(study_dir):
    workdir, args = study_dir
    evals = sorted(workdir.glob("steps_*/seed_*/eval.json"))
    stamps = [p.stat().st_mtime_ns for p in evals]
    assert len(evals) == 4
    assert cli.main(args) == 0
    assert [p.stat().st_mtime_ns for p in evals] == stamps
    assert cli.main(args + ["--report-only"]) == 0


def test_a_config_without_budgets_is_refused(tmp_path):
    assert cli.main(["study", "--config", CI, "--workdir", str(tmp_path / "s"), "--report-only"]) == 1
