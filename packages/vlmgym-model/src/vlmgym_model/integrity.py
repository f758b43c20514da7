"""Integrity of saved weights: sha256 manifests, finiteness checks and atomic writes.

```
params/                      an orbax checkpoint (any directory of files)
  manifest.json              {"format": "vlmgym-manifest", "version": 1,
                              "block_bytes": 67108864,
                              "files": {"_METADATA": {"size": 401, "sha256": ["9f0c..."]},
                                        "d/3ff3...": {"size": 2536, "sha256": [...]}, ...}}
```

What is hashed: the bytes of every file the writer left in the directory (orbax's metadata,
its OCDBT manifests and data files), in blocks of `block_bytes` (64 MiB), one sha256 per
block. Hashing files, not arrays, makes the check independent of the dtype a checkpoint is
restored to and of how the arrays are sharded, and it runs before orbax parses anything, so
a flipped byte is a one-line `CheckpointIntegrityError` naming the file and byte range, not
a traceback from TensorStore (or, worse, weights of 3e38). Blocks are hashed on a thread
pool (hashlib releases the GIL): about 1 s per GB per core. 630M bf16 parameters, 0.97 GB
of files: 1.0 s on one core, 0.5 s on two (orbax took 9.7 s to write them). OCDBT packs
many arrays per data file, so a mismatch names the file; `check_finite` names the tensor
when corrupt values do get through (a checkpoint saved before manifests existed, or a
model that diverged before it was saved).

Atomic writes: `write_bytes_atomic` / `write_text_atomic` write a hidden temporary file in
the destination's directory, fsync it and `os.replace` it over the destination, so a
reader sees the old file or the whole new one, never a torn one (and a full disk leaves
the old file). `replace_dir` does the same for a directory (moved aside, then deleted only
once the new one is in place).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "vlmgym-manifest"
VERSION = 1
BLOCK_BYTES = 64 * 1024**2  # bytes per hashed block (blocks hash in parallel)
READ_BYTES = 8 * 1024**2  # bytes per read inside a block


class CheckpointIntegrityError(ValueError):
    """Saved weights that are corrupt: bytes that differ from their manifest, files that
    cannot be parsed, or values that are not finite. The message names the file or tensor."""


def temp_sibling(path: Path, kind: str = "tmp") -> Path:
    """A hidden, unique name beside `path`: `.NAME.tmp-1a2b3c4d` (kind "tmp") or
    `.NAME.old-1a2b3c4d`."""
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}")


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (renames into it) to disk; a no-op where unsupported."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a fsynced temporary sibling and `os.replace`."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    """`write_bytes_atomic` of UTF-8 text."""
    write_bytes_atomic(path, text.encode())


def replace_dir(new: Path, path: Path) -> None:
    """Move the complete directory `new` to `path`; an existing `path` is moved aside first
    and deleted only once `new` is in place (put back if the move fails)."""
    old = temp_sibling(path, "old")
    if path.exists():
        path.rename(old)
    try:
        os.replace(new, path)
    except BaseException:
        if old.exists() and not path.exists():
            old.rename(path)
        raise
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def remove_temp(path: Path) -> None:
    """Delete `path` and anything a writer derived from its name (orbax writes into
    `<path>.orbax-checkpoint-tmp-<n>` first)."""
    for p in [path, *path.parent.glob(f"{path.name}.*")]:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


# ------------------------------------------------------------------ manifests


def _files(root: Path) -> list[str]:
    """Every file under `root` but the manifest, as sorted POSIX paths relative to it."""
    rels = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return sorted(r for r in rels if r != MANIFEST)


def _block_digest(path: Path, start: int, length: int) -> str:
    """sha256 of `length` bytes of `path` from `start` (fewer if the file is shorter)."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        pos, end = start, start + length
        while pos < end:
            chunk = os.pread(fd, min(READ_BYTES, end - pos), pos)
            if not chunk:
                break
            h.update(chunk)
            pos += len(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def _digests(root: Path, sizes: dict[str, int], block: int) -> dict[str, list[str]]:
    """{relative path: [sha256 of each `block`-byte block]} (an empty file: one block)."""
    jobs = [(rel, k) for rel, size in sizes.items() for k in range(max(1, -(-size // block)))]
    workers = max(1, min(8, os.cpu_count() or 1, len(jobs)))
    with ThreadPoolExecutor(workers) as pool:
        done = list(pool.map(lambda job: _block_digest(root / job[0], job[1] * block, block), jobs))
    out: dict[str, list[str]] = {rel: [] for rel in sizes}
    for (rel, _), digest in zip(jobs, done, strict=True):
        out[rel].append(digest)
    return out


def write_manifest(root: str | Path) -> Path:
    """Hash every file under `root` into `root/manifest.json` (written atomically)."""
    root = Path(root)
    sizes = {rel: (root / rel).stat().st_size for rel in _files(root)}
    digests = _digests(root, sizes, BLOCK_BYTES)
    files = {rel: {"size": sizes[rel], "sha256": digests[rel]} for rel in sizes}
    manifest = {"format": FORMAT, "version": VERSION, "block_bytes": BLOCK_BYTES, "files": files}
    write_text_atomic(root / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return root / MANIFEST


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entry_ok(rel: str, entry: Any, block: int) -> bool:
    """A manifest entry: a relative path inside the directory, a size, one digest a block."""
    path = PurePosixPath(rel)
    if path.is_absolute() or ".." in path.parts or rel == MANIFEST:
        return False
    if not isinstance(entry, dict) or not _is_count(entry.get("size")):
        return False
    digests = entry.get("sha256")
    blocks = max(1, -(-entry["size"] // block))
    return (
        isinstance(digests, list)
        and len(digests) == blocks
        and all(isinstance(d, str) for d in digests)
    )


def _read_manifest(path: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    """(block_bytes, files) of a manifest, every field checked."""
    try:
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        raise CheckpointIntegrityError(f"{path} is unreadable: {err}") from err
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise CheckpointIntegrityError(f"{path} is not a version-{VERSION} {FORMAT} file")
    block, files = raw.get("block_bytes"), raw.get("files")
    if not _is_count(block) or block == 0 or not isinstance(files, dict):
        raise CheckpointIntegrityError(f"{path} has no valid block_bytes and files")
    for rel, entry in files.items():
        if not _entry_ok(rel, entry, block):
            raise CheckpointIntegrityError(f"{path}: entry {rel!r} is malformed")
    return block, files


def verify_manifest(root: str | Path) -> bool:
    """Check every file listed in `root/manifest.json` against its size and sha256s.

    Returns False (and logs a warning) when there is no manifest: a checkpoint saved before
    manifests existed. Raises CheckpointIntegrityError naming the first file that is
    missing, has another size, or whose bytes differ (with the byte range).
    """
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        log.warning("%s has no %s: its files cannot be checked for corruption", root, MANIFEST)
        return False
    block, files = _read_manifest(path)
    for rel, entry in files.items():
        f = root / rel
        if not f.is_file():
            raise CheckpointIntegrityError(f"{f} is missing (listed in {path})")
        size = f.stat().st_size
        if size != entry["size"]:
            raise CheckpointIntegrityError(
                f"{f} has {size} bytes; {path} records {entry['size']} (truncated or replaced)"
            )
    digests = _digests(root, {rel: e["size"] for rel, e in files.items()}, block)
    for rel, entry in files.items():
        for k, (got, want) in enumerate(zip(digests[rel], entry["sha256"], strict=True)):
            if got != want:
                end = min(entry["size"], (k + 1) * block)
                raise CheckpointIntegrityError(
                    f"{root / rel}: bytes {k * block}..{end} do not match their sha256 in "
                    f"{path}: the checkpoint is corrupt"
                )
    extra = sorted(set(_files(root)) - set(files))
    if extra:
        log.warning("%s holds files its %s does not list: %s", root, MANIFEST, extra)
    return True


# ------------------------------------------------------------------ values


def is_float(dtype: Any) -> bool:
    """Whether `dtype` is a floating or complex dtype (bfloat16 and the ml_dtypes included)."""
    import jax.numpy as jnp

    return bool(jnp.issubdtype(dtype, jnp.inexact))


def nonfinite_host(flat: dict[str, Any]) -> list[str]:
    """Names of the host (numpy) float arrays in `flat` holding a NaN or an infinity."""
    return [n for n, x in flat.items() if is_float(x.dtype) and not np.isfinite(x).all()]


def _finite_flags(leaves: list[Any]) -> Any:
    import jax.numpy as jnp

    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])  # [len(leaves)]


@functools.cache
def _finite_flags_jit() -> Any:
    import jax

    return jax.jit(_finite_flags)


def check_finite(flat: dict[str, Any], where: str | Path) -> None:
    """Raise CheckpointIntegrityError naming every array of `flat` with a NaN or infinity.

    Works on numpy arrays and on jax arrays of any float dtype sharded on any mesh: one
    jitted all(isfinite) reduction per tensor, fused (no temporary of the tensor's size),
    returning a replicated vector of flags. Collective when the arrays span several
    processes, like the restore that made them.
    """
    import jax

    names = [n for n, x in flat.items() if is_float(x.dtype)]
    if not names:
        return
    if all(not isinstance(flat[n], jax.Array) for n in names):
        bad = nonfinite_host({n: flat[n] for n in names})
    else:
        flags = _finite_flags_jit()([flat[n] for n in names])
        host = np.asarray(flags.addressable_data(0) if flags.is_fully_replicated else flags)
        bad = [n for n, ok in zip(names, host, strict=True) if not ok]
    if bad:
        raise CheckpointIntegrityError(
            f"{where}: non-finite values (NaN or inf) in {', '.join(bad)}"
        )
