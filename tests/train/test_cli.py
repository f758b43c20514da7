"""`vlmgym-train`'s helpers that run before any training."""

from __future__ import annotations

import pytest
from vlmgym_train.cli import malloc_in_use


@pytest.mark.parametrize(
    "preload,want",
    [
        (None, "glibc"),
        ("", "glibc"),
        ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "tcmalloc"),
        ("/opt/libfoo.so:/usr/lib/libjemalloc.so.2", "jemalloc"),
        ("/opt/libfoo.so", "glibc"),
    ],
)
def test_malloc_in_use_reads_ld_preload(monkeypatch, preload, want):
    if preload is None:
        monkeypatch.delenv("LD_PRELOAD", raising=False)
    else:
        monkeypatch.setenv("LD_PRELOAD", preload)
    assert malloc_in_use() == want
