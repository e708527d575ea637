"""What the processes of a multi-host run exchange besides arrays: barriers and small JSON values.

With one process every function here is a no-op or the identity, so callers need no branch.
"""

from __future__ import annotations

import json
from typing import Any, Callable, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

T = TypeVar("T")


def barrier(name: str) -> Callable[[], None]:
    """A function that waits until every process has called it (with the same `name`)."""
    if jax.process_count() == 1:
        return lambda: None
    return lambda: multihost_utils.sync_global_devices(name)


def primary_first(name: str, work: Callable[[], T]) -> T:
    """`work()` in process 0, then, after a barrier named `name`, in the others: what process 0 writes while
    doing it (a link, a prepared corpus), the others find written."""
    primary = jax.process_index() == 0
    if primary:
        result = work()
    barrier(name)()
    if not primary:
        result = work()
    return result


def allgather_json(value: Any) -> list[Any]:
    """Every process's JSON-serialisable `value`, in process order, on every process."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.int32(len(data)))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:len(data)] = data
    rows = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[:n])) for row, n in zip(rows, lengths)]


def padded_to_longest(batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """This process's `batches` (its data shard's, at least one), then empty ones (zeros: loss mask 0) up to the
    most any process has: a loop over them makes as many collective steps in every process."""
    count = max(allgather_json(len(batches)))
    empty = {key: np.zeros_like(value) for key, value in batches[0].items()}
    return batches + [empty] * (count - len(batches))
