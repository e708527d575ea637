"""Row-sparse ("lazy") Adam for the memory table.

Plain Adam on a zero gradient still moves a row (its moments decay and the bias
correction keeps stepping), so a domain absent from a batch would drift. Here a
step works on gathered rows only: the rows of the batch's domains, their moments
and their *per-row* step counts are gathered, updated with Adam, and scattered
back; every other row of the parameters, `mu`, `nu` and `count` is not touched at
all, hence bit-identical. The per-row count makes bias correction follow how often
a domain has been trained rather than the global step, so a rarely seen domain
gets the same first updates as a frequent one (a new domain added late starts
like a fresh Adam). Cost is O(rows in the batch), independent of the table size.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sparsemem.koff.memory import gather_rows, scatter_rows


class RowAdamState(NamedTuple):
    mu: Any  # like the table
    nu: Any  # like the table
    count: jax.Array  # [D] int32: Adam steps taken by each row


def init(table: Any, num_domains: int) -> RowAdamState:
    zeros = jax.tree.map(jnp.zeros_like, table)
    return RowAdamState(mu=zeros, nu=jax.tree.map(jnp.zeros_like, table),
                        count=jnp.zeros((num_domains,), jnp.int32))


def gather(state: RowAdamState, slots: jax.Array) -> RowAdamState:
    return RowAdamState(gather_rows(state.mu, slots), gather_rows(state.nu, slots),
                        jnp.take(state.count, slots, mode="fill", fill_value=0))


def scatter(state: RowAdamState, slots: jax.Array, rows: RowAdamState) -> RowAdamState:
    return RowAdamState(scatter_rows(state.mu, slots, rows.mu), scatter_rows(state.nu, slots, rows.nu),
                        state.count.at[slots].set(rows.count, mode="drop"))


def update(grads: Any, state: RowAdamState, params: Any, *, lr: float, b1: float, b2: float,
           eps: float) -> tuple[Any, RowAdamState]:
    """One Adam step on gathered rows `[K, ...]` with per-row bias correction."""
    count = state.count + 1
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
    c = count.astype(jnp.float32)

    def step(p, m, v):
        shape = (-1,) + (1,) * (p.ndim - 1)
        m_hat = m / (1 - b1 ** c).reshape(shape)
        v_hat = v / (1 - b2 ** c).reshape(shape)
        return p - lr * m_hat / (jnp.sqrt(v_hat) + eps)

    return jax.tree.map(step, params, mu, nu), RowAdamState(mu, nu, count)
