"""Benchmark variants in their own processes, timed in interleaved rounds.

Each variant is a child process that builds and warms up its step, then runs it once
per request from the parent, so peak memory is the variant's own and a busy machine's
load drifts hit all variants alike. A variant can import another commit's `sparsemem`
(`package_at`), which is how a benchmark compares against the previous implementation.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable

import hardware


def package_at(rev: str) -> str:
    """A temporary folder holding `sparsemem/` as of git revision `rev` (for PYTHONPATH); removed at exit."""
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], check=True, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    folder = tempfile.mkdtemp(prefix=f"sparsemem-{rev.replace('/', '_')}-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    archive = subprocess.run(["git", "archive", rev, "sparsemem"], check=True, capture_output=True, cwd=root).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return folder


class ChildFailed(RuntimeError):
    """A benchmark child's step raised (its error, e.g. out of memory) or the child died."""


class Worker:
    """A child `python script *argv` speaking `serve()`'s protocol; `.info` is what it said when ready."""

    def __init__(self, script: str, argv: list[str], pythonpath: str | None = None):
        env = dict(os.environ)
        if pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen([sys.executable, script, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        atexit.register(self.proc.kill)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise ChildFailed(f"benchmark child {self.proc.args} exited with {self.proc.wait()} (see its stderr)")
        message = json.loads(line)
        if "error" in message:
            self.proc.wait()
            raise ChildFailed(message["error"])
        return message

    def run(self) -> float:
        """Seconds of one step."""
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._read()["seconds"]

    def close(self) -> dict:
        """The child's peak memory; it exits."""
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        out = self._read()
        self.proc.wait()
        return out


def interleaved(workers: list[Worker], rounds: int) -> list[list[float]]:
    """Seconds per step of each worker over `rounds` alternating rounds."""
    times = [[] for _ in workers]
    for _ in range(rounds):
        for worker, out in zip(workers, times):
            out.append(worker.run())
    return times


@contextlib.contextmanager
def errors_reported():
    """Child side: an exception in the block (out of memory, a compile error) is said to the parent in place of
    the next answer, so the parent raises `ChildFailed` with it; the child then exits with the traceback."""
    try:
        yield
    except Exception as error:
        print(json.dumps({"error": f"{type(error).__name__}: {error}"}), flush=True)
        raise


def serve(step: Callable[[], float | None], info: dict) -> None:
    """Child side: run `step` once (warm-up), say `info`, then time one step per `run` line until `quit`.

    A step that returns a Python float has timed itself (e.g. one phase of a longer call): that is its time.
    """
    step()
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        start = time.perf_counter()
        own = step()
        print(json.dumps({"seconds": own if isinstance(own, float) else time.perf_counter() - start}), flush=True)
    peak, kind = hardware.peak_memory_bytes()
    print(json.dumps({"peak_bytes": peak, "peak_kind": kind}), flush=True)
