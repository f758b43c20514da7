"""The machine under test: its peak numbers, its memory counters, and a timer.

Peaks are datasheet figures (dense bf16 tensor-core FLOP/s without sparsity, HBM bytes/s),
looked up by `jax.Device.device_kind`. An unknown device gets `None` peaks: MFU and
roofline shares are then reported as null rather than guessed.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax

# (substring of device_kind, dense bf16 FLOP/s, HBM bytes/s). First match wins, so the
# more specific names come first ("GH200" before "H200", "H100 PCIe" before "H100").
PEAKS: tuple[tuple[str, float, float], ...] = (
    ("GH200", 989e12, 4.0e12),
    ("H200", 989e12, 4.8e12),
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100 NVL", 835e12, 3.9e12),
    ("H100", 989e12, 3.35e12),  # SXM5, 80 GB HBM3
    ("H800", 989e12, 3.35e12),
    ("A100-SXM4-40GB", 312e12, 1.555e12),
    ("A100-PCIE-40GB", 312e12, 1.555e12),
    ("A100", 312e12, 2.0e12),  # 80 GB parts
    ("L40S", 362e12, 0.864e12),
    ("A10G", 70e12, 0.6e12),
)


def device_peaks(device_kind: str) -> dict[str, Any]:
    """{"bf16_flops": float | None, "hbm_bytes_per_s": float | None, "matched": str | None}."""
    for name, flops, bandwidth in PEAKS:
        if name.lower() in device_kind.lower():
            return {"bf16_flops": flops, "hbm_bytes_per_s": bandwidth, "matched": name}
    return {"bf16_flops": None, "hbm_bytes_per_s": None, "matched": None}


def device_slug(device_kind: str) -> str:
    """A file-name-safe form of the device kind: "NVIDIA H200" -> "nvidia-h200"."""
    return re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-") or "unknown"


def device_info() -> dict[str, Any]:
    """What ran the check: versions, backend, the first device and its peaks."""
    import jaxlib

    device = jax.devices()[0]
    return {
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "peaks": device_peaks(device.device_kind),
    }


def memory_stats() -> dict[str, int] | None:
    """The first device's allocator counters (`bytes_in_use`, `peak_bytes_in_use`, ...), or
    None where the backend keeps none (CPU). The peak is cumulative over the process: JAX
    has no call that resets it."""
    stats = jax.devices()[0].memory_stats()
    return None if stats is None else {k: int(v) for k, v in stats.items()}


def median_seconds(fn: Callable[[], Any], repeats: int, trial_s: float = 0.02) -> float:
    """Seconds per call of `fn`: the median over `repeats` trials, each of k calls issued
    back to back and waited for once (k sized from an untimed first call so that a trial
    lasts about `trial_s`). Dispatch of the next call then overlaps the device's work, as
    in a real loop, and sub-millisecond kernels are not timed as launch overhead."""
    start = time.perf_counter()
    jax.block_until_ready(fn())  # compiles and first-touch allocations, untimed
    calls = max(1, min(100, int(trial_s / max(time.perf_counter() - start, 1e-6))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        outs = [fn() for _ in range(calls)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def error_text(err: BaseException) -> str:
    """One line naming an exception: its type and the first line of its message, cut short."""
    lines = str(err).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(err).__name__}: {first[:300]}"
