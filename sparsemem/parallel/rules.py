"""Logical axis names -> mesh axes: one rules table for parameters and activations.

Every parameter carries `logical_axes` metadata (e.g. `("layers", "embed", "heads",
"head_dim")`) and the main activations are constrained with logical names too. A
rules table maps each logical name to zero, one or several mesh axes. Resolution is
forgiving so that one table serves every mesh: mesh axes the current mesh lacks are
dropped, a mesh axis is used at most once per array, and a dimension that the mesh
axes do not divide is left replicated. With no mesh at all, constraints are no-ops.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: Rules = (
    # activations
    ("batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "model"),
    ("act_kv_heads", "model"),
    ("act_mlp", "model"),
    ("act_vocab", "model"),
    # parameters
    ("layers", None),
    ("embed", "fsdp"),
    ("vocab", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("head_dim", None),
    ("mlp", "model"),
    ("norm", None),
    # KOFF tables
    ("domain", ("data", "fsdp")),
    ("memory_slots", None),
    ("lora_rank", None),
    ("lora_in", None),
    ("lora_out", None),
)

_current_rules: contextvars.ContextVar[Rules] = contextvars.ContextVar("sparsemem_axis_rules", default=DEFAULT_RULES)


@contextlib.contextmanager
def axis_rules(rules: Rules) -> Iterator[None]:
    """Use `rules` for every logical-axis resolution inside the block."""
    token = _current_rules.set(tuple(rules))
    try:
        yield
    finally:
        _current_rules.reset(token)


def current_rules() -> Rules:
    return _current_rules.get()


def _mesh_axes_for(name: str | None, rules: Rules) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    raise KeyError(f"Logical axis {name!r} has no rule; add it to the rules table (known: "
                   f"{', '.join(n for n, _ in rules)})")


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh_shape: dict[str, int],
                    rules: Rules | None = None) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dims have the given logical names."""
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    rules = current_rules() if rules is None else rules
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_axes, shape):
        axes = [a for a in _mesh_axes_for(name, rules) if a in mesh_shape and a not in used and mesh_shape[a] > 1]
        while axes and dim % math.prod(mesh_shape[a] for a in axes):
            axes.pop()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int],
                   rules: Rules | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, dict(mesh.shape), rules))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names under the current mesh; a no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, dict(mesh.shape)))
