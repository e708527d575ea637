"""`sparsemem run`, then `analyze`, `extend` and `route` on the finished run, as two `jax.distributed` processes on
loopback, end to end, against one process.

The CI config, cut to two variants (`koff`, and `random_mask` for a baseline mask file), one
seed, 4 steps with a checkpoint every 2, few and short evaluation rows, one multiple-choice task
scored in one setting, few analysis tokens; it still goes through every phase: setup (`jax.distributed` from the environment, one data mesh over
both processes' devices), data shards (each process reads its own), train, evaluate (documents,
swap matrix, multiple choice), analyse (LAPE), export, report, and resume.

The test starts this file twice as a script per invocation (2 CPU devices each, coordinator on
127.0.0.1 at a free port, `JAX_COORDINATOR_ADDRESS`/`JAX_NUM_PROCESSES`/`JAX_PROCESS_ID`):
first both processes stop at step 3 of the first variant (the step-2 checkpoint exists) and are
SIGKILLed, then both rerun the command and finish. On the finished run, exported once, two more
invocations run `analyze` and `extend` (a folder domain, 4 steps), killed at step 3 of `extend`,
then `extend` again (it resumes) and `route`. The reference is one process (4 of the 8
test devices, same mesh) training on the two shards' batches concatenated, which is the global
batch of the two processes. Every Python-level write under the work directory is recorded
(`sys.addaudithook`: opens for writing, renames, removals, mkdirs, links) except orbax's checkpoints
(the run's and the extension's), in which every process takes part by design.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

if __name__ == "__main__":  # a worker: its own devices, set before jax starts
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).parent.parent
CI = str(ROOT / "experiments" / "configs" / "ci.py")
PROCESSES = 2
OVERRIDES = ["train.variants=('koff','random_mask')", "train.seeds=1", "train.steps=4", "train.save_every=2",
             "mesh.data=4", "eval.documents=2", "eval.paragraphs=4", "eval.resamples=20",
             "eval.seq_len=128", "eval.context=32", "eval.mc_tasks=('continuation',)", "eval.mc_settings=('koff',)",
             "analysis.tokens=200", "analysis.permutations=10"]
STALL_AT = 3  # steps done when the first invocation's processes stop and are killed
RTOL = 1e-5  # float32 sums whose reduction order differs between one and two processes
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_WRITE_EVENTS = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.chmod", "os.link",
                 "os.symlink", "shutil.copyfile", "shutil.rmtree"}


def command(workdir, *extra: str) -> list[str]:
    return ["run", "--config", CI, "--workdir", str(workdir), *(f"--set={o}" for o in OVERRIDES + list(extra))]


# -- worker side -------------------------------------------------------------------------------------------------


def record_writes(workdir: str, log_path: str) -> None:
    """Append `{"event", "path"}` to `log_path` for every write this process makes under `workdir` (not in a
    `checkpoints` folder: the run's and each extension's)."""
    root = os.path.realpath(workdir)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)  # opened before the hook: not recorded

    def hook(event, args):
        if event == "open":
            paths = [args[0]] if args[2] is not None and args[2] & _WRITE_FLAGS else []
        elif event in _WRITE_EVENTS:
            paths = list(args[:2]) if event == "os.rename" else [args[0]]
        else:
            return
        for path in paths:
            if isinstance(path, (str, os.PathLike)):
                path = os.path.realpath(os.fspath(path))
                relative = os.path.relpath(path, root)
                if path.startswith(root) and "checkpoints" not in pathlib.Path(relative).parts:
                    os.write(fd, (json.dumps({"event": event, "path": relative}) + "\n").encode())

    sys.addaudithook(hook)


def stall_at(step: int, marker: str) -> None:
    """Make the first train step that starts at `step` touch `marker` and wait there (to be killed)."""
    from sparsemem.train.trainer import KoffTrainer

    original = KoffTrainer.train_step

    def train_step(self, state, batch):
        if int(state.step) == step:
            pathlib.Path(marker).touch()
            time.sleep(600)
        return original(self, state, batch)

    KoffTrainer.train_step = train_step


def worker(workdir: str, log_path: str, stall: int, marker: str, commands: str) -> int:
    """Run the CLI `commands` (a JSON list of argument lists) in turn; the first that fails ends the worker."""
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py: the reference's setting
    from sparsemem import cli

    record_writes(workdir, log_path)
    if stall:
        stall_at(stall, marker)
    for argv in json.loads(commands):
        status = cli.main(argv)
        if status:
            return status
    return 0


# -- test side ---------------------------------------------------------------------------------------------------


def start(workdir, tmp_path, invocation: str, commands: list[list[str]], stall: int = 0) -> list[subprocess.Popen]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    out = []
    for i in range(PROCESSES):
        env = {**base, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(PROCESSES),
               "JAX_PROCESS_ID": str(i), "PYTHONPATH": os.pathsep.join([str(ROOT), base.get("PYTHONPATH", "")])}
        args = [str(workdir), str(tmp_path / f"writes-{invocation}-{i}.jsonl"), str(stall),
                str(tmp_path / f"{invocation}-{i}"), json.dumps(commands)]
        out.append(subprocess.Popen([sys.executable, __file__, *args], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True))
    return out


def finish(workers, timeout: float = 900) -> list[str]:
    try:
        logs = [w.communicate(timeout=timeout)[0] for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    assert [w.returncode for w in workers] == [0] * PROCESSES, "\n".join(log[-4000:] for log in logs)
    return logs


def kill_when_stalled(workers, tmp_path, invocation: str, timeout: float = 900) -> list[str]:
    markers = [tmp_path / f"{invocation}-{i}" for i in range(PROCESSES)]
    deadline = time.monotonic() + timeout
    while not all(m.exists() for m in markers):
        exited = [w.poll() for w in workers]
        if any(code is not None for code in exited) or time.monotonic() > deadline:
            for w in workers:
                w.kill()
            logs = [w.communicate()[0] for w in workers]
            raise AssertionError(f"workers did not reach step {STALL_AT} (exit codes {exited}):\n"
                                 + "\n".join(log[-4000:] for log in logs))
        time.sleep(0.2)
    for w in workers:
        w.send_signal(signal.SIGKILL)
    return [w.communicate()[0] for w in workers]


class StackedShards:
    """One process's view of the two processes' global batch: every shard's rows in process order (resumable)."""

    def __init__(self, streams):
        self.streams = streams

    def __iter__(self):
        return self

    def __next__(self):
        rows = [next(stream) for stream in self.streams]
        return {key: np.concatenate([r[key] for r in rows]) for key in rows[0]}

    def get_state(self):
        return {str(i): stream.get_state() for i, stream in enumerate(self.streams)}

    def set_state(self, state):
        for i, stream in enumerate(self.streams):
            stream.set_state(state[str(i)])


def assert_json_close(got, want, where="$"):
    """Equal structure and non-float values; floats within RTOL (NaN equals NaN)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), where
        for key in want:
            assert_json_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_json_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-7, err_msg=where)
    else:
        assert got == want, where


def writes(tmp_path, process: int, *invocations: str) -> list[dict]:
    paths = [tmp_path / f"writes-{invocation}-{process}.jsonl" for invocation in invocations]
    return [json.loads(line) for path in paths if path.exists() for line in path.read_text().splitlines()]


def one_process_batches(monkeypatch) -> None:
    """Make one process train on the two shards' batches concatenated: the two processes' global batch."""
    from sparsemem.data.pipeline import Shard
    from sparsemem.experiment import setup

    one_process = setup.train_batches
    monkeypatch.setattr(setup, "train_batches", lambda config, sources, tokenizer: StackedShards(
        [one_process(config, sources, tokenizer, shard=Shard(i, PROCESSES)) for i in range(PROCESSES)]))


def assert_npz_close(got, want, name: str) -> None:
    from sparsemem.experiment.variant_files import load_npz

    a, b = load_npz(got / name), load_npz(want / name)
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=RTOL, atol=1e-6, err_msg=f"{name}:{key}")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, demo_folder):
    """The run as two processes (both killed at step 3, then rerun) and as one: `(tmp_path, two, one, logs)`."""
    from sparsemem import cli

    tmp_path = tmp_path_factory.mktemp("multihost")
    workdir = tmp_path / "two"
    run = [command(workdir, "mesh.distributed=True")]
    logs = kill_when_stalled(start(workdir, tmp_path, "stalled", run, stall=STALL_AT), tmp_path, "stalled")
    assert (workdir / "checkpoints" / "koff" / "2").is_dir(), "\n".join(logs)
    assert not (workdir / "eval.json").exists()  # killed mid-training, before any later phase
    logs = finish(start(workdir, tmp_path, "resumed", run))
    reference = tmp_path / "one"
    with pytest.MonkeyPatch.context() as monkeypatch:
        one_process_batches(monkeypatch)
        assert cli.main(command(reference)) == 0
    return tmp_path, workdir, reference, logs


@pytest.mark.slow
def test_two_processes_run_like_one_write_once_and_resume_after_both_are_killed(finished):
    from sparsemem.experiment.metrics import read_metrics

    tmp_path, workdir, reference, logs = finished
    assert "[koff] resuming from step 2" in logs[0]
    assert writes(tmp_path, 1, "stalled", "resumed") == []  # process 1 wrote nothing under the work directory
    renamed = [w["path"] for w in writes(tmp_path, 0, "stalled", "resumed") if w["event"] == "os.rename"]
    for name in ("config.json", "eval.json", "analysis.json", "baselines/random_mask.npz",
                 "export/koff/mask.npz", "export/koff/memory/de.npz", "export/random_mask/mask.npz"):
        assert renamed.count(name) == 1, (name, renamed)  # process 0 wrote each result once (atomically)
    assert renamed.count("report.md") == 1

    for name in ("eval.json", "analysis.json", "export/koff/sparsity.json", "export/koff/controller.json"):
        assert_json_close(json.loads((workdir / name).read_text()), json.loads((reference / name).read_text()),
                          name)
    got, want = read_metrics(workdir), read_metrics(reference)
    assert [(m["variant"], m["step"]) for m in got] == [("koff", s) for s in (1, 2, 3, 4)]  # random_mask: no memory
    np.testing.assert_allclose([m["loss"] for m in got], [m["loss"] for m in want], rtol=RTOL)
    for name in ("export/koff/mask.npz", "export/random_mask/mask.npz", "export/koff/memory/en-US.npz"):
        assert_npz_close(workdir, reference, name)
    assert (workdir / "report.md").read_text().count("\n") > 20


@pytest.mark.slow
def test_two_processes_analyze_extend_and_route_like_one_write_once_and_resume_extend(finished, monkeypatch):
    """`analyze`, then `extend` (both processes killed at step 3 of its 4, then rerun), then `route` on the finished
    run and its export, as two processes and as one."""
    from sparsemem import cli
    from sparsemem.experiment.metrics import read_metrics
    from test_extend import write_folder

    tmp_path, workdir, reference, _ = finished
    folder = write_folder(tmp_path / "valves")
    for run in (workdir, reference):
        assert cli.main(["export", "--run", str(run)]) == 0  # `route` reads the export; `extend` adds to it

    def commands(run, *names: str) -> list[list[str]]:
        argv = {"analyze": ["analyze", "--workdir", str(run)],
                "extend": ["extend", "--run", str(run), "--folder", f"valves={folder}", "--steps", "4"],
                "route": ["route", "--run", str(run), "--documents", "2", "--lengths", "8,16", "--ppl-prompt", "8",
                          "--continuation", "8", "--batch-size", "2"]}
        return [argv[name] for name in names]

    workers = start(workdir, tmp_path, "extend-stalled", commands(workdir, "analyze", "extend"), stall=STALL_AT)
    logs = kill_when_stalled(workers, tmp_path, "extend-stalled")
    home = workdir / "extend" / "valves"
    assert (home / "checkpoints" / "2").is_dir() and not (home / "eval.json").exists(), "\n".join(logs)
    logs = finish(start(workdir, tmp_path, "extend-resumed", commands(workdir, "extend", "route")))
    assert "[extend valves] resuming from step 2" in logs[0]
    one_process_batches(monkeypatch)
    for argv in commands(reference, "extend", "route"):  # the reference's analysis.json is its run's
        assert cli.main(argv) == 0

    invocations = ("extend-stalled", "extend-resumed")
    assert writes(tmp_path, 1, *invocations) == []  # process 1 wrote nothing, in either invocation
    renamed = [w["path"] for w in writes(tmp_path, 0, *invocations) if w["event"] == "os.rename"]
    for name in ("analysis.json", "extensions.json", "extend/valves/before.json", "extend/valves/eval.json",
                 "export/koff/memory/valves.npz", "export/koff/serve/modules/valves/manifest.json", "route.json"):
        assert renamed.count(name) == 1, (name, renamed)
    assert renamed.count("report.md") == 3  # after analyze, extend and route

    for name in ("analysis.json", "extend/valves/eval.json"):
        assert_json_close(json.loads((workdir / name).read_text()), json.loads((reference / name).read_text()),
                          name)
    routed, want = (json.loads((run / "route.json").read_text()) for run in (workdir, reference))
    assert set(routed.pop("cost")) == set(want.pop("cost"))  # wall times: each run's own
    assert_json_close(routed, want, "route.json")
    assert routed["domains"] == ["en-US", "de", "valves"]
    got, want = read_metrics(home), read_metrics(reference / "extend" / "valves")
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    np.testing.assert_allclose([m["loss"] for m in got], [m["loss"] for m in want], rtol=RTOL)
    assert_npz_close(workdir, reference, "export/koff/memory/valves.npz")


if __name__ == "__main__":
    sys.exit(worker(*sys.argv[1:3], int(sys.argv[3]), *sys.argv[4:6]))
