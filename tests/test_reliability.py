"""Nothing lost, nothing stuck: run-directory safety, damaged files, one-line CLI errors (fast unit tests).

The end-to-end checks on a real CI run (fault injection, SIGTERM exit status) are in test_experiment_run.py.
"""

import json
import os
import pathlib
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from sparsemem import cli, files
from sparsemem.checkpoints.hf import load_hf_checkpoint, read_config
from sparsemem.checkpoints.run_state import PER_PROCESS, DataStateError, RunCheckpointer
from sparsemem.data import text_folder
from sparsemem.experiment.config import load_config
from sparsemem.experiment.metrics import MetricsLog, drop_torn_line, read_metrics
from sparsemem.experiment.rundir import MARKER, RunDir
from sparsemem.experiment.setup import PROCESS_ENV, start_distributed
from sparsemem.models.config import preset, to_hf_config

ROOT = pathlib.Path(__file__).parent.parent
CI = str(ROOT / "experiments" / "configs" / "ci.py")


def run_cli(capsys, *argv):
    """`(exit status, stderr)` of `sparsemem ARGV`."""
    status = cli.main(list(argv))
    return status, capsys.readouterr().err


def test_a_foreign_folder_is_refused_and_left_untouched(tmp_path, capsys):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "report.md").write_text("my own report")
    (foreign / "metrics.jsonl").write_text('{"loss": 1}\n')
    status, err = run_cli(capsys, "run", "--config", CI, "--workdir", str(foreign))
    assert status == 1 and "not a sparsemem run directory" in err and str(foreign) in err
    assert sorted(p.name for p in foreign.iterdir()) == ["metrics.jsonl", "report.md"]
    assert (foreign / "report.md").read_text() == "my own report"
    status, err = run_cli(capsys, "run", "--config", CI, "--workdir", str(foreign / "report.md"))
    assert status == 1 and "is a file" in err


def test_a_run_directory_is_recognised_by_its_marker_or_its_config(tmp_path):
    config = load_config(CI)
    run = RunDir.prepare(tmp_path / "run", config)
    assert (run.path / MARKER).exists() and run.config().to_dict() == config.to_dict()
    (run.path / MARKER).unlink()  # a run made before the marker existed
    assert RunDir.check(run.path, config).is_run()
    (run.path / "config.json").write_text(json.dumps({"model_type": "llama"}))  # e.g. a model folder
    assert not RunDir(run.path).is_run()


@pytest.mark.parametrize("override, problem", [
    ("data.languages=('xx','en-US')", "Unknown LibreOffice help language 'xx'"),
    ("mesh.data=16", "needs 16 devices but 8 are visible"),
    ("train.log_every=0", "train.log_every=0 must be >= 1"),
    ("train.save_every=-1", "train.save_every=-1 must be >= 0"),
    ("data.languages=('de','de')", "names a language twice"),
])
def test_setup_errors_write_nothing_so_the_corrected_rerun_is_not_locked_out(tmp_path, capsys, override, problem):
    workdir = tmp_path / "run"
    status, err = run_cli(capsys, "run", "--config", CI, "--workdir", str(workdir), "--set", override)
    assert status == 1 and problem in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not workdir.exists()


def test_a_second_run_on_a_held_work_directory_is_refused_with_the_holders_pid(tmp_path, capsys):
    config = load_config(CI)
    with RunDir.check(tmp_path / "run", config).open(config) as run:
        assert (run.path / ".lock").read_text().strip() == str(os.getpid())
        status, err = run_cli(capsys, "run", "--config", CI, "--workdir", str(run.path))
        assert status == 1 and f"in use by another `sparsemem run` (pid {os.getpid()})" in err
        with pytest.raises(ValueError, match="in use"):
            with run.locked():
                pass
    with run.locked():  # released when the holder is done (or killed: the kernel drops its flock)
        pass


def test_metrics_readers_skip_a_torn_last_line_and_name_a_damaged_one(tmp_path):
    rows = [{"variant": "koff", "step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path = tmp_path / "metrics.jsonl"
    path.write_text(text + '{"variant": "koff", "st')  # killed during a write
    assert read_metrics(tmp_path) == rows
    drop_torn_line(path)
    assert path.read_text() == text
    drop_torn_line(path)  # a whole file is left as it is
    assert path.read_text() == text
    path.write_text(text.replace('"step": 2', '"stp": 2'))
    with pytest.raises(ValueError, match=f"{path}:2 is damaged"):
        read_metrics(tmp_path)


def _state(scale):
    return {"a": jnp.arange(64.0) * scale, "b": {"c": jnp.full((4, 4), scale)}}


def test_resume_falls_back_to_the_newest_readable_checkpoint_step(tmp_path, caplog):
    directory = tmp_path / "checkpoints" / "koff"
    checkpointer = RunCheckpointer(directory, max_to_keep=2)
    for step in (2, 4):
        checkpointer.save(step, _state(step), {"position": step})
    checkpointer.close()
    arrays = [p for p in (directory / "4" / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    for path in arrays:  # truncate every data file of the newest step
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _state(1))
    checkpointer = RunCheckpointer(directory, max_to_keep=2)
    state, data = checkpointer.restore_newest_readable(abstract)
    np.testing.assert_array_equal(state["a"], _state(2)["a"])
    assert data == {"position": 2} and checkpointer.all_steps() == [2]
    assert "checkpoint step 4" in caplog.text and "unreadable" in caplog.text
    assert (tmp_path / "checkpoints" / "koff.damaged-step-4").is_dir()  # kept for inspection, out of orbax's way
    checkpointer.save(4, _state(4), {"position": 4})  # training continues and saves step 4 again
    assert checkpointer.restore_newest_readable(abstract)[1] == {"position": 4}
    checkpointer.close()
    for step in checkpointer.all_steps():
        (directory / str(step) / "_CHECKPOINT_METADATA").write_text("{")
        for path in (directory / str(step) / "state").rglob("*"):
            if path.is_file():
                path.write_bytes(b"")
    assert RunCheckpointer(directory).restore_newest_readable(abstract) is None  # nothing readable: start over
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "koff", "koff.damaged-step-2", "koff.damaged-step-4", "koff.damaged-step-4-2"]


def test_a_checkpoint_saved_by_another_number_of_processes_is_refused_not_set_aside(tmp_path):
    directory = tmp_path / "checkpoints" / "koff"
    checkpointer = RunCheckpointer(directory)
    checkpointer.save(2, _state(2), {PER_PROCESS: [{"position": 1}, {"position": 2}]})  # as two processes save it
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _state(1))
    with pytest.raises(DataStateError, match="saved by 2 process.*this run has 1"):
        checkpointer.restore_newest_readable(abstract)
    assert checkpointer.all_steps() == [2]  # not damage: the step stays
    checkpointer.save(4, _state(4), {"position": 4})  # one process saves its own state as is
    assert checkpointer.restore(abstract)[1] == {"position": 4}
    checkpointer.close()


@pytest.mark.parametrize("env", [{"JAX_NUM_PROCESSES": "2"}, {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "one"}])
def test_an_incomplete_process_environment_is_refused_naming_both_variables(monkeypatch, env):
    for name in PROCESS_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="set both JAX_NUM_PROCESSES and JAX_PROCESS_ID"):
        start_distributed()
    assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("name", ["..txt", "...txt", ".hidden.jsonl"])
def test_domain_names_that_cannot_name_a_file_are_refused_naming_the_file(tmp_path, name):
    (tmp_path / "en.txt").write_text("hello")
    (tmp_path / name).write_text("hallo")
    with pytest.raises(ValueError, match=f"Corpus entry {tmp_path / name} gives the domain name"):
        text_folder.TextFolderConfig(tmp_path)


def test_cli_errors_are_one_line_and_debug_shows_the_traceback(capsys):
    status, err = run_cli(capsys, "data", "prepare", "--languages", " , ")
    assert status == 1 and err.startswith("error: --languages ' , ' names no language")
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="names no language"):
        cli.main(["--debug", "data", "prepare", "--languages", ""])


def test_a_preempted_run_exits_75(monkeypatch):
    from sparsemem.experiment import run as run_lib

    def preempted(config, workdir):
        raise run_lib.Interrupted("[koff] stopped at step 3 on SIGTERM")

    monkeypatch.setattr(run_lib, "run", preempted)
    assert cli.main(["run", "--config", CI]) == cli.EXIT_PREEMPTED == 75


def _model_folder(path: pathlib.Path, extra: dict | None = None) -> pathlib.Path:
    """A folder with a real `config.json` and a safetensors file (one small tensor: enough for header errors)."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({**to_hf_config(preset("qwen3-0.6b")), **(extra or {})}))
    save_file({"model.embed_tokens.weight": np.zeros((64, 32), np.float32)}, str(path / "model.safetensors"))
    return path


def test_model_folder_errors_name_the_file_and_the_fix(tmp_path):
    folder = _model_folder(tmp_path / "model")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{folder / 'model.safetensors'} is damaged or truncated.*re-download"):
        load_hf_checkpoint(folder)
    (folder / "config.json").write_text('{"model_type": "llama", "hidden')
    with pytest.raises(ValueError, match=f"{folder / 'config.json'} is damaged or truncated"):
        read_config(folder)
    compact = _model_folder(tmp_path / "compact", {"sparsemem": {"format": "sparsemem-compact-backbone/1"}})
    with pytest.raises(ValueError, match="compacted sparsemem backbone.*sparsemem generate --run"):
        load_hf_checkpoint(compact)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_honour_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        files.write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary file left


def test_only_process_0_writes_and_the_others_wait_for_its_run_directory(tmp_path, monkeypatch):
    config = load_config(CI)
    order = []
    with RunDir(tmp_path / "run").open(config, primary=True, barrier=lambda: order.append("barrier")) as run:
        assert order == ["barrier"] and (run.path / MARKER).exists() and (run.path / "config.json").exists()
        other = RunDir(run.path)
        with other.open(config, primary=False, barrier=lambda: order.append("other waits")):
            other.write_json("eval.json", {"x": 1})
            other.record_time("setup", 1.0)
            monkeypatch.setattr(jax, "process_index", lambda: 1)
            metrics = MetricsLog(run.path, "koff", ["en-US", "de"], total_steps=2, first_step=0, log_every=1)
            metrics(1, {"loss": 1.0, "expected_sparsity": 0.1, "target": 0.1, "tokens_per_s": 1.0,
                        "loss_by_domain": {0: 1.0}})
            metrics.close()
        assert order == ["barrier", "other waits"]
    assert sorted(p.name for p in run.path.iterdir()) == [".lock", MARKER, "config.json"]
