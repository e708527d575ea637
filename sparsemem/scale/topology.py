"""Cloud TPU slice names -> compile-only JAX devices, and the chip figures a fit check needs.

`resolve("v5p-32")` returns the 16 TPU v5p devices of that slice, made by libtpu on
any machine (no TPU needed) for ahead-of-time compilation. Names follow Cloud TPU's
accelerator types: v4 and v5p count TensorCores (2 per chip, one JAX device per chip
in megacore mode), v5e and v6e count chips. `2xv5p-32` is two such slices
(multi-slice, DCN between them).
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax

# Per-chip HBM and peak bf16 matmul throughput, from the Cloud TPU system-architecture
# pages (cloud.google.com/tpu/docs/{v4,v5p,v5e,v6e}); HBM in decimal GB as published.
CHIPS = {
    "v4": dict(jax_name="v4", hbm_bytes=32 * 10**9, peak_flops=275e12, megacore=True),
    "v5p": dict(jax_name="v5", hbm_bytes=95 * 10**9, peak_flops=459e12, megacore=True),
    "v5e": dict(jax_name="v5e", hbm_bytes=16 * 10**9, peak_flops=197e12, megacore=False),
    "v6e": dict(jax_name="v6e", hbm_bytes=32 * 10**9, peak_flops=918e12, megacore=False),
}
# Slice shapes by the number in the accelerator type (cores for v4/v5p, chips for v5e/v6e).
_SHAPES_3D = {8: (2, 2, 1), 16: (2, 2, 2), 32: (2, 2, 4), 64: (2, 4, 4), 128: (4, 4, 4), 256: (4, 4, 8),
              512: (4, 8, 8), 1024: (8, 8, 8)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
SHAPES = {"v4": _SHAPES_3D, "v5p": _SHAPES_3D, "v5e": _SHAPES_2D, "v6e": _SHAPES_2D}
_ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}
_NAME = re.compile(r"^(?:(\d+)x)?(v4|v5p|v5e|v6e|v5litepod|v6litepod)-(\d+)$")


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given, e.g. "v5p-32"
    generation: str  # v4 | v5p | v5e | v6e
    shape: tuple[int, ...]  # chips per slice along the ICI axes
    num_slices: int
    devices: tuple[jax.Device, ...]
    hbm_bytes: int  # per chip
    peak_flops: float  # per chip, bf16

    @property
    def num_chips(self) -> int:
        return len(self.devices)

    @property
    def num_hosts(self) -> int:
        return len({(getattr(d, "slice_index", 0), d.process_index) for d in self.devices})

    @property
    def jax_name(self) -> str:
        return f"{CHIPS[self.generation]['jax_name']}:{'x'.join(map(str, self.shape))}"


def accepted_names() -> list[str]:
    """Every single-slice name `resolve` knows (prefix `Nx` for N slices)."""
    return [f"{g}-{n}" for g, shapes in SHAPES.items() for n in shapes]


def _host_bounds(generation: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Chips per host: 2x2x1 on v4/v5p; v5e/v6e slices up to 8 chips are one host, larger ones 2x2 per host."""
    if len(shape) == 3:
        return (2, 2, 1)
    chips = shape[0] * shape[1]
    return (shape[0], shape[1], 1) if chips <= 8 else (2, 2, 1)


def resolve(name: str) -> Topology:
    """The compile-only devices of slice `name` (e.g. `v5p-8`, `v4-32`, `v5e-16`, `v6e-8`, `2xv5p-32`)."""
    match = _NAME.match(name.strip().lower())
    generation = _ALIASES.get(match.group(2), match.group(2)) if match else None
    size = int(match.group(3)) if match else None
    if generation is None or size not in SHAPES[generation]:
        raise ValueError(f"Unknown TPU topology {name!r}; accepted: {', '.join(accepted_names())} "
                         "(prefix 2x, 4x, ... for several slices, e.g. 2xv5p-32)")
    slices = int(match.group(1) or 1)
    if slices < 1:
        raise ValueError(f"{name!r}: the number of slices must be >= 1")
    from jax.experimental import topologies  # noqa: PLC0415 (needs libtpu only when used)

    chip = CHIPS[generation]
    shape = SHAPES[generation][size]
    # Compile-only use needs no TPU, so it need not hold libtpu's one-process-per-machine lock either.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=f"{chip['jax_name']}:{'x'.join(map(str, shape))}",
            chip_config_name="megacore" if chip["megacore"] else "default",
            chips_per_host_bounds=_host_bounds(generation, shape), num_slices=slices, wrap=(False, False, False))
    except (RuntimeError, ImportError) as error:
        raise RuntimeError(f"cannot build the {name} topology ({error}); compiling for TPU needs libtpu: "
                           "pip install 'jax[tpu]' (the version of your jax)") from error
    return Topology(name, generation, shape, slices, tuple(desc.devices), chip["hbm_bytes"], chip["peak_flops"])
