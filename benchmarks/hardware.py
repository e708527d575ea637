"""What the machine can do, for benchmark tables: peak matmul FLOP/s and peak memory of a process.

On CPU the peak is measured (a square float32 matmul probe, best of a few, in the same
run as the benchmark so it sees the same load); on GPU/TPU it is the vendor's dense
peak for the compute dtype (no sparsity), from the data sheets named below.
"""

from __future__ import annotations

import resource
import time

# Dense (no 2:4 sparsity) matmul peaks per chip, FLOP/s, by compute dtype. NVIDIA H100/H200 SXM data sheets
# (bf16 989 TFLOP/s; float32 without TF32 67 TFLOP/s); Cloud TPU system-architecture pages (bf16).
VENDOR_PEAKS = {
    "NVIDIA H200": {"bfloat16": 989e12, "float32": 67e12},
    "NVIDIA H100": {"bfloat16": 989e12, "float32": 67e12},
    "TPU v4": {"bfloat16": 275e12},
    "TPU v5p": {"bfloat16": 459e12},
    "TPU v5 lite": {"bfloat16": 197e12},
    "TPU v6 lite": {"bfloat16": 918e12},
}


def measured_matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """Best float32 FLOP/s of a jitted `[size, size] @ [size, size]` on the default device."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    jax.block_until_ready(matmul(a))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a))
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(dtype: str) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) for the default device and compute dtype."""
    import jax

    device = jax.devices()[0]
    if device.platform == "cpu":
        return measured_matmul_peak(), "measured float32 matmul probe"
    for name, peaks in VENDOR_PEAKS.items():
        if device.device_kind.startswith(name) and dtype in peaks:
            return peaks[dtype], f"{name} {dtype} data-sheet peak"
    raise ValueError(f"no vendor peak for {device.device_kind!r} in {dtype}: add it to VENDOR_PEAKS in "
                     f"benchmarks/hardware.py")


def peak_memory_bytes() -> tuple[int, str]:
    """(peak bytes, what they measure): the device allocator's peak, or on CPU the process's peak RSS."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak bytes in use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"
