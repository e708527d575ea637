"""What the machine can do, for benchmark tables: peak matmul FLOP/s and peak memory of a process.

On CPU the peak is what the cores can do: the float32 FMA rate at the reported clock,
read from /proc/cpuinfo, or the best of several measured matmul probes when that is
higher (turbo). A probe alone is no peak: taken at a loaded moment it reads low, and
a later run then shows more than 100% of it. On GPU/TPU it is the vendor's dense peak
for the compute dtype (no sparsity), from the data sheets named below.
"""

from __future__ import annotations

import os
import pathlib
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


# Float32 matmul probes: square products of several sizes, and a chain of products in one program
# (dispatch amortised). The best of all of them is the measured peak.
PROBE_SIZES = (1024, 2048)
PROBE_CHAIN = (2048, 4)  # size, products per call


def measured_matmul_peak(repeats: int = 2) -> tuple[float, str]:
    """(best float32 FLOP/s over the probes, which probe) on the default device."""
    import jax
    import jax.numpy as jnp

    def chain(a):
        return jax.lax.fori_loop(0, PROBE_CHAIN[1], lambda _, x: (x @ a) * (1.0 / PROBE_CHAIN[0]), a)

    probes = [(f"{n}^2 matmul", jax.jit(lambda a: a @ a), n, 1) for n in PROBE_SIZES]
    probes.append((f"{PROBE_CHAIN[1]} chained {PROBE_CHAIN[0]}^2 matmuls", jax.jit(chain), *PROBE_CHAIN))
    best = (0.0, "")
    for name, fn, n, products in probes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        jax.block_until_ready(fn(a))
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(a))
            best = max(best, (2 * n**3 * products / (time.perf_counter() - start), name))
    return best


def cpu_vector_peak() -> tuple[float, str]:
    """(float32 FLOP/s, how it is counted): cores x clock x FMA lanes x 2 FMA units x 2, from /proc/cpuinfo.

    Lanes: 16 with AVX-512, 8 with AVX2+FMA, else 4 (SSE). AMD cores before Zen 5 (family
    < 0x1a) run AVX-512 on 256-bit units, so 8 there. The clock is the one the kernel
    reports (a virtual machine shows its nominal clock; turbo runs above it).
    """
    info = pathlib.Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    lanes = 16 if "avx512f" in flags else 8 if {"avx2", "fma"} <= flags else 4
    if fields.get("vendor_id") == "AuthenticAMD" and int(fields.get("cpu family", 0)) < 0x1A:
        lanes = min(lanes, 8)
    cores, ghz = len(os.sched_getaffinity(0)), float(fields.get("cpu MHz", 0)) / 1e3
    return cores * ghz * 1e9 * lanes * 2 * 2, f"{cores} cores x {ghz:.2f} GHz x {lanes} lanes x 2 FMA x 2"


def peak_flops(dtype: str) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) for the default device and compute dtype.

    On CPU: the larger of the vector peak at the reported clock (`cpu_vector_peak`) and the
    best measured matmul (above it only when the cores turbo). A fraction of this peak says
    how much of the machine a run got, whatever else was running.
    """
    import jax

    device = jax.devices()[0]
    if device.platform == "cpu":
        counted, how = cpu_vector_peak()
        measured, probe = measured_matmul_peak()
        return max(counted, measured), (f"measured float32 matmul probe {measured / 1e9:.0f} GFLOP/s ({probe}); "
                                        f"{how} = {counted / 1e9:.0f}; the larger")
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


def load_average() -> tuple[float, float, float]:
    """The machine's 1, 5 and 15-minute load averages: how much else ran beside a benchmark."""
    return os.getloadavg()
