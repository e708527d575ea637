"""Orbax save/restore of a whole KOFF run: train state, data-iterator state, array layout.

The train state is stored as a nested dict of arrays named by its pytree path
(`gates/head`, `memory_opt/mu/k`, ...), so a checkpoint does not depend on Python
container classes, and restoring onto another mesh only needs the new abstract
state (`KoffTrainer.abstract_state`, shapes + shardings). Orbax writes each step to
a temporary directory and renames it when complete, so a crash mid-save never
leaves a partial step behind: the previous step stays the latest. A step damaged
after it was written is moved aside by `restore_newest_readable`, which falls back to
the next older step.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from sparsemem.files import as_path, is_local, set_aside
from sparsemem.parallel import multihost

log = logging.getLogger(__name__)


# Key of the data state when every process saved its own (multi-host runs).
PER_PROCESS = "per_process"


class CheckpointLayoutError(ValueError):
    """A checkpoint's arrays differ in names or shapes from the state being restored."""


class DataStateError(ValueError):
    """A checkpoint's data state was saved by another number of processes than restore it."""


def _name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    raise TypeError(f"unsupported pytree path entry {entry!r}")


def _nest(tree: Any) -> dict:
    """`tree` as a nested dict keyed by its path entries."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        node = out
        for entry in path[:-1]:
            node = node.setdefault(_name(entry), {})
        node[_name(path[-1])] = leaf
    return out


def _layout(nested: dict, prefix: str = "") -> dict[str, list]:
    """`{path: [shape, dtype]}` of every leaf of a nested dict."""
    out = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            out.update(_layout(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = [list(value.shape), str(value.dtype)]
    return out


def _unnest(nested: dict, like: Any) -> Any:
    """Rebuild the pytree `like` from a nested dict made by `_nest`."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for path, _ in paths:
        node = nested
        for entry in path:
            node = node[_name(entry)]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


class RunCheckpointer:
    """Keeps the last `max_to_keep` run checkpoints under `directory` (one subdirectory per step)."""

    def __init__(self, directory: str | epath.Path, *, max_to_keep: int | None = 3):
        self.directory = as_path(directory) if not is_local(directory) else epath.Path(directory).absolute()  # an
        # epath `gs://` path's absolute() prepends the working directory
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict | None = None) -> None:
        """Write `state` (and the data iterator's JSON state) as `step`; blocks until durable.

        Every process takes part. Each process reads its own data shard, so with several
        processes the data state saved is every process's (process 0 writes the JSON).
        """
        nested = _nest(state)
        data_state = data_state or {}
        if jax.process_count() > 1:
            data_state = {PER_PROCESS: multihost.allgather_json(data_state)}
        self.manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(nested),
            data=ocp.args.JsonSave(data_state),
            layout=ocp.args.JsonSave(_layout(nested))), force=True)
        self.manager.wait_until_finished()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """`(state, data_state)` from `step` (default: latest), laid out as `abstract_state`.

        `abstract_state` holds `jax.ShapeDtypeStruct`s with the shardings wanted now
        (any mesh); a checkpoint whose arrays differ in names or shapes is refused.
        """
        step = self.latest_step() if step is None else step
        if step is None or step not in self.manager.all_steps():
            raise FileNotFoundError(f"no run checkpoint{'' if step is None else f' for step {step}'} in "
                                    f"{self.directory} (found steps {self.all_steps()})")
        target = _nest(abstract_state)
        self._check_layout(step, _layout(target))
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        return _unnest(restored["state"], abstract_state), self._own_data_state(dict(restored["data"] or {}), step)

    def _check_layout(self, step: int, expected: dict[str, list], prefix: str = "") -> None:
        """Refuse step `step` unless its arrays whose paths start with `prefix` are exactly `expected`."""
        saved = self.manager.restore(step, args=ocp.args.Composite(layout=ocp.args.JsonRestore()))["layout"]
        saved = {path: value for path, value in saved.items() if path.startswith(prefix)}
        if saved != expected:
            diff = sorted(set(map(str, saved.items())) ^ set(map(str, expected.items())))[:6]
            raise CheckpointLayoutError(
                f"checkpoint step {step} in {self.directory} does not match this run's state (different "
                f"num_domains, memory_slots, lora_targets, block_gates or model?); differing arrays: {diff}")

    def _own_data_state(self, data_state: dict, step: int) -> dict:
        """This process's data state from a saved one (saved by one process, or by every process)."""
        if PER_PROCESS not in data_state:
            saved = 1
        else:
            saved = len(data_state[PER_PROCESS])
            if saved == jax.process_count():
                return data_state[PER_PROCESS][jax.process_index()]
        if saved != jax.process_count():
            raise DataStateError(
                f"checkpoint step {step} in {self.directory} was saved by {saved} process(es), this run has "
                f"{jax.process_count()}: each process reads its own data shard, so the data position cannot carry "
                "over; resume with the same number of hosts, or start a new --workdir")
        return data_state

    def restore_part(self, name: str, like: Any, step: int | None = None) -> Any:
        """The arrays under `name` (e.g. `"gates"`) of `step` (default: latest) as host arrays, shaped like `like`.

        Only that part's layout is checked, so a reader of, say, the gates needs neither
        the whole abstract state nor a mesh; a part of another layout is refused.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no run checkpoint in {self.directory}")
        self._check_layout(step, _layout({name: _nest(like)}), prefix=f"{name}/")
        return _unnest(self.restore_arrays(step)[name], like)

    def restore_newest_readable(self, abstract_state: Any) -> tuple[Any, dict] | None:
        """`restore` from the newest step that reads back (None if none does); unreadable steps are moved aside.

        A step that orbax finished writing can still be damaged later (a full disk, a copy
        cut short, a bad sector); the older steps it keeps (`max_to_keep`) are there for this.
        A step of another run's layout is not damage: `CheckpointLayoutError` still stops.
        """
        for step in sorted(self.all_steps(), reverse=True):
            try:
                return self.restore(abstract_state, step)
            except (CheckpointLayoutError, DataStateError):
                raise
            except Exception as error:  # orbax/tensorstore raise many types for unreadable files
                aside = set_aside(self.directory / str(step),
                                  self.directory.parent / f"{self.directory.name}.damaged-step-{step}")
                self.manager.reload()
                log.warning("checkpoint step %d in %s is unreadable (%s: %s); moved it to %s and trying the "
                            "next older step", step, self.directory, type(error).__name__,
                            str(error).splitlines()[0][:300], aside)
        return None

    def restore_arrays(self, step: int | None = None) -> dict:
        """The state of `step` (default: latest) as saved: a nested dict of host arrays, no target needed."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no run checkpoint in {self.directory}")
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]

    def close(self) -> None:
        self.manager.close()
