"""Device meshes and sharding of NNX state by its `logical_axes` metadata."""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from sparsemem.parallel.rules import Rules, named_sharding

MESH_AXES = ("data", "fsdp", "model")


def make_mesh(shape: dict[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` with axes ('data', 'fsdp', 'model').

    `shape` gives the size of some axes; one axis may be -1 (fills the rest). Missing
    axes get size 1, so `{"data": 2, "model": 4}` is the (2,4) data x model mesh.
    Axes are `Auto` so XLA propagates shardings from the constraints we place.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = dict(shape or {"data": -1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"Unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
    sizes = {a: shape.get(a, 1) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"At most one mesh axis may be -1, got {free}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot fill mesh {shape}")
        sizes[free[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"Mesh {sizes} needs {math.prod(sizes.values())} devices but {len(devices)} are given; "
                         "change the mesh shape or the device count")
    return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def _logical_axes(var: nnx.Variable) -> tuple[str | None, ...]:
    axes = var.get_metadata().get("logical_axes")
    if axes is None:
        return (None,) * len(var.shape)
    return tuple(axes)


def state_shardings(state: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """NamedShardings for every Variable in an NNX state (abstract or concrete)."""

    def one(var):
        if not isinstance(var, nnx.Variable):
            return NamedSharding(mesh, PartitionSpec())
        return var.replace(named_sharding(mesh, _logical_axes(var), var.shape, rules))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
