"""Row-sparse Adam: gathered rows follow plain Adam, the others are untouched."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsemem.koff import rowsparse
from sparsemem.koff.memory import distinct_rows, gather_rows, scatter_rows


def test_distinct_rows_pads_and_inverts():
    slots, inv = distinct_rows(jnp.array([3, 1, 3, 1]), num_domains=5)
    np.testing.assert_array_equal(slots, [1, 3, 5, 5])
    np.testing.assert_array_equal(slots[inv], [3, 1, 3, 1])
    table = {"w": jnp.arange(10.0).reshape(5, 2)}
    keep, hit = np.array([0, 2, 4]), np.array([1, 3])
    rows = gather_rows(table, slots)
    np.testing.assert_array_equal(rows["w"][2:], 0.0)
    out = scatter_rows(table, slots, jax.tree.map(lambda r: r + 100, rows))
    np.testing.assert_array_equal(out["w"][keep], table["w"][keep])
    np.testing.assert_array_equal(out["w"][hit], table["w"][hit] + 100)


def test_row_adam_matches_optax_adam_per_row_and_leaves_absent_rows():
    D, lr = 4, 0.1
    table = {"w": jax.random.normal(jax.random.key(0), (D, 3))}
    state = rowsparse.init(table, D)
    ref_params = table["w"][1]
    ref_tx = optax.adam(lr)
    ref_state = ref_tx.init(ref_params)
    # Row 1 is trained at every step, row 2 only at the first; rows 0 and 3 never.
    for step, domains in enumerate([[1, 2], [1, 1], [1, 1]]):
        slots, _ = distinct_rows(jnp.array(domains), D)
        params = gather_rows(table, slots)
        grads = {"w": jnp.sin(params["w"] * (step + 1))}
        new_rows, new_state = rowsparse.update(grads, rowsparse.gather(state, slots), params, lr=lr,
                                               b1=0.9, b2=0.999, eps=1e-8)
        before = jax.tree.map(np.asarray, (table, state))
        table = scatter_rows(table, slots, new_rows)
        state = rowsparse.scatter(state, slots, new_state)
        updates, ref_state = ref_tx.update(grads["w"][0], ref_state)
        ref_params = ref_params + updates
        if step > 0:  # row 2 absent: params, moments and count bit-identical
            np.testing.assert_array_equal(table["w"][2], before[0]["w"][2])
            np.testing.assert_array_equal(state.mu["w"][2], before[1].mu["w"][2])
            np.testing.assert_array_equal(state.nu["w"][2], before[1].nu["w"][2])
    np.testing.assert_allclose(table["w"][1], ref_params, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(state.count, [0, 3, 1, 0])
    np.testing.assert_array_equal(np.asarray(state.mu["w"])[[0, 3]], 0.0)
