"""The host's malloc under XLA's CPU backend: which one runs, and glibc settings that make a
training step reuse its memory instead of page-faulting it in again every step.

XLA's CPU runtime allocates one executable's temporaries as a single block per call (for a
GRPO step on the real 0.5B checkpoint, 5.4 GiB: gradients, saved activations, logits) and
frees it when the call returns. glibc's malloc serves a block that large with `mmap` and
gives it back with `munmap` on free, so the next step touches fresh pages: about 1.4 million
page faults, each zero-filled by the kernel, a third of the step's CPU time. tcmalloc and
jemalloc keep freed blocks. `tune_glibc_malloc` makes glibc keep them too:

- `M_MMAP_MAX = 0`: serve every block from the heap, never from a private mapping;
- `M_TRIM_THRESHOLD = -1` (as an unsigned size, the largest): never hand the heap's top back;
- `M_ARENA_MAX = 1`: one heap for every thread. Without it XLA's worker threads allocate
  from their own arenas, which cannot grow past 64 MiB and fall back to `mmap` regardless.

The prices: the process's resident memory stays at its peak (as with any caching malloc),
and one arena is one lock, which XLA's threads contend for on every small allocation. For a
large model the faults saved outweigh the lock by far (the 0.5B update: 15.7 -> 8.5 s); for a
small one the lock costs more (the tiny preset's default run: about 47 -> 65 s). So the programs
(`vlmgym-train`, `vlmgym-eval`, `vlmgym-sample`) call `tune_for_checkpoint`, which tunes
only for a checkpoint of at least `MIN_CHECKPOINT_BYTES` on disk. The arena limit takes hold
only for threads that have not allocated yet, so either call belongs before the first JAX
computation.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

# mallopt's parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

#: VLMGYM_TUNE_MALLOC=0 leaves glibc's malloc at its defaults; =1 tunes it for any checkpoint.
ENV_SWITCH = "VLMGYM_TUNE_MALLOC"

#: The checkpoint size (bytes on disk) from which `tune_for_checkpoint` tunes.
MIN_CHECKPOINT_BYTES = 256 << 20

_tuned = False


def malloc_in_use() -> str:
    """The malloc this process runs on: "tcmalloc" or "jemalloc" when preloaded
    (`LD_PRELOAD`), "glibc (tuned)" after `tune_glibc_malloc`, else "glibc"."""
    preload = os.environ.get("LD_PRELOAD", "")
    for name in ("tcmalloc", "jemalloc"):
        if name in preload:
            return name
    return "glibc (tuned)" if _tuned else "glibc"


def tune_glibc_malloc() -> bool:
    """Make glibc's malloc keep freed memory for reuse (module docstring); True if it did.

    Does nothing, and returns False, off Linux's glibc, under a preloaded malloc, or with
    VLMGYM_TUNE_MALLOC=0. Call it before the first JAX computation; calling it again is
    harmless.
    """
    global _tuned
    if _tuned:
        return True
    if os.environ.get(ENV_SWITCH, "1") == "0" or malloc_in_use() != "glibc":
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
    _tuned = all(libc.mallopt(param, value) == 1 for param, value in settings)
    return _tuned


def checkpoint_bytes(model_dir: str | os.PathLike[str]) -> int:
    """The bytes of the files under `model_dir` (0 when it is not a directory)."""
    total = 0
    for root, _, files in os.walk(model_dir):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                continue
    return total


def is_large_checkpoint(model_dir: str | os.PathLike[str] | None) -> bool:
    """Whether `model_dir` holds at least `MIN_CHECKPOINT_BYTES` (None, the tiny preset: no)."""
    return model_dir is not None and checkpoint_bytes(model_dir) >= MIN_CHECKPOINT_BYTES


def tune_for_checkpoint(model_dir: str | os.PathLike[str] | None) -> bool:
    """`tune_glibc_malloc` when the model is large enough to gain from it
    (`is_large_checkpoint`), or for any model with VLMGYM_TUNE_MALLOC=1. True if glibc is
    tuned."""
    switch = os.environ.get(ENV_SWITCH, "")
    if switch == "0" or (switch != "1" and not is_large_checkpoint(model_dir)):
        return False
    return tune_glibc_malloc()
