"""Shared test settings: the numeric tolerance table and JAX's compilation cache.

The tolerance table is the only place tolerances live. A parity failure is a bug to find;
never widen an entry to make a test pass.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Max abs difference allowed between two implementations of the same computation, by dtype.
TOLERANCES: dict[str, float] = {
    "float32": 1e-4,  # logits and hidden states, JAX vs HF torch, both fp32
    "image": 1e-5,  # preprocessed pixel values vs HF's image processor
    "bfloat16": 2e-2,  # kernels in bf16 vs their fp32 reference (relative to O(1) values)
}


def pytest_configure(config: pytest.Config) -> None:
    # Compiles dominate test time on small CPU machines; cache them outside the repository.
    cache_dir = os.environ.get(
        "VLMGYM_TEST_JAX_CACHE", str(Path.home() / ".cache" / "vlmgym" / "jax-test-cache")
    )
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", cache_dir)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


@pytest.fixture(scope="session")
def tol() -> dict[str, float]:
    """The tolerance table (see TOLERANCES)."""
    return dict(TOLERANCES)
