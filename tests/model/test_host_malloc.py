"""The host malloc helpers `vlmgym-train` runs before any training (`vlmgym_model.host_malloc`)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
from vlmgym_model import host_malloc
from vlmgym_model.host_malloc import (
    MIN_CHECKPOINT_BYTES,
    malloc_in_use,
    tune_for_checkpoint,
    tune_glibc_malloc,
)


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


def test_tuning_is_skipped_when_switched_off_or_preloaded(monkeypatch):
    # Neither case reaches mallopt, so this process's malloc is left as it was.
    monkeypatch.setattr(host_malloc, "_tuned", False)
    monkeypatch.setenv("VLMGYM_TUNE_MALLOC", "0")
    assert tune_glibc_malloc() is False
    monkeypatch.delenv("VLMGYM_TUNE_MALLOC")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    assert tune_glibc_malloc() is False
    assert malloc_in_use() == "tcmalloc"


@pytest.fixture
def tune_calls(monkeypatch):
    """`tune_for_checkpoint`'s decisions, recorded instead of applied to this process."""
    calls: list[bool] = []
    monkeypatch.setattr(host_malloc, "tune_glibc_malloc", lambda: calls.append(True) or True)
    monkeypatch.delenv("VLMGYM_TUNE_MALLOC", raising=False)
    return calls


def test_programs_tune_only_for_a_large_checkpoint(tmp_path, monkeypatch, tune_calls):
    small, large = tmp_path / "small", tmp_path / "large"
    (small / "params").mkdir(parents=True)
    (small / "params" / "w.safetensors").write_bytes(b"x" * 4096)
    (large / "params").mkdir(parents=True)
    with open(large / "params" / "w.safetensors", "wb") as f:
        f.truncate(MIN_CHECKPOINT_BYTES)  # sparse: the size counts, not the blocks
    assert tune_for_checkpoint(None) is False  # the tiny preset
    assert tune_for_checkpoint(small) is False
    assert tune_for_checkpoint(tmp_path / "missing") is False
    assert tune_calls == []
    assert tune_for_checkpoint(large) is True
    assert tune_calls == [True]
    monkeypatch.setenv("VLMGYM_TUNE_MALLOC", "0")
    assert tune_for_checkpoint(large) is False
    monkeypatch.setenv("VLMGYM_TUNE_MALLOC", "1")
    assert tune_for_checkpoint(None) is True
    assert tune_calls == [True, True]


# A child process allocates a 256 MiB block from a fresh thread (as XLA's workers do), fills
# it, frees it, and does it again; it reports the page faults of the second round. Freed and
# handed back to the OS, the block faults in again page by page (65536 of them); kept, it
# does not fault at all.
CHILD = """
import ctypes, json, resource, sys, threading
from vlmgym_model.host_malloc import malloc_in_use, tune_glibc_malloc
tuned = tune_glibc_malloc() if sys.argv[1] == "tune" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20
faults = []
def rounds():
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
worker = threading.Thread(target=rounds)
worker.start()
worker.join()
print(json.dumps({"tuned": tuned, "malloc": malloc_in_use(), "faults": faults}))
"""


def run_child(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GLIBC_TUNABLES")}
    env.pop("VLMGYM_TUNE_MALLOC", None)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)
def test_tuned_glibc_keeps_a_freed_block_for_the_next_step():
    untuned = run_child("plain")
    tuned = run_child("tune")
    assert untuned["malloc"] == "glibc" and not untuned["tuned"]
    assert tuned["malloc"] == "glibc (tuned)" and tuned["tuned"]
    pages = (256 << 20) // 4096
    # The control: glibc's defaults map the block afresh every time.
    assert untuned["faults"][1] > pages // 2, untuned
    # Tuned: the second round reuses the first round's pages.
    assert tuned["faults"][0] > pages // 2, tuned
    assert tuned["faults"][1] < pages // 50, tuned
