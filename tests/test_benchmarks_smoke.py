"""The accelerator suite runs end to end on CPU at tiny sizes, writes a consistent JSON + markdown report, and
turns a workload that fails into a row saying so."""

import json
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_accelerator_suite_smoke(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on a real host
    env["JAX_PLATFORMS"] = "cpu"
    # cuDNN's kernel cannot compile on CPU: its rows fail, and the suite goes on to the next workload.
    cmd = ["bash", str(ROOT / "benchmarks" / "accelerator.sh"), str(tmp_path), "--tiny", "--dtype", "float32",
           "--models", "gemma-3-270m", "--workloads", "forward/lm_loss,train,serve/decode", "--remat", "dots",
           "--attention", "cudnn,auto", "--batch", "2", "--seq", "32", "--serve-batch", "2", "--prompt", "16",
           "--steps", "2"]
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    report = json.loads((tmp_path / "accelerator.json").read_text())
    assert report["platform"] == "cpu" and report["tiny"] and report["peak_flops"] > 0
    assert [(r["workload"], r["attention"]) for r in report["rows"]] == [
        (workload, kernel) for workload in ("forward/lm_loss", "train/remat=dots", "serve/decode")
        for kernel in ("cudnn", "auto")]
    failed, measured = report["rows"][::2], report["rows"][1::2]
    assert all("cuDNN is not detected" in r["error"] and "seconds" not in r for r in failed)
    for row in measured:
        assert row["seconds"] > 0 and row["peak_bytes"] > 0
        assert row["tokens_per_s"] == pytest.approx((2 if row["workload"] == "serve/decode" else 64) / row["seconds"])
        assert row["mfu"] == pytest.approx(row["model_flops"] / row["seconds"] / report["peak_flops"])
    table = (tmp_path / "accelerator.md").read_text()
    assert table.count("| gemma-3-270m |") == 6 and "measured float32 matmul probe" in table
    assert table.count("| cudnn | 2 x ") == 3 and table.count("RuntimeError: cuDNN is not detected.") == 3


def test_accelerator_suite_spent_budget_leaves_rows_saying_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    cmd = ["bash", str(ROOT / "benchmarks" / "accelerator.sh"), str(tmp_path), "--tiny", "--dtype", "float32",
           "--models", "gemma-3-270m,llama-3.2-1b", "--workloads", "forward/hidden,train", "--remat", "none,dots",
           "--budget", "0"]
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    rows = json.loads((tmp_path / "accelerator.json").read_text())["rows"]
    assert [(r["model"], r["workload"]) for r in rows] == [
        (model, workload) for model in ("gemma-3-270m", "llama-3.2-1b")
        for workload in ("forward/hidden", "train/remat=none", "train/remat=dots")]
    assert all(r["error"] == "not run: the suite's --budget of 0s was spent" for r in rows)
    assert (tmp_path / "accelerator.md").read_text().count("**not run: the suite's --budget of 0s was spent**") == 6
