"""Adapter directories: LoRA adapters saved apart from the base model they were trained on.

```
adapter_dir/
  lora.json   {"format_version", "rank", "alpha", "targets", "use_rslora",
               "base_model_dir", "base_fingerprint"}
  arrays/     orbax checkpoint of {"text.layers.q_proj.a": float32[L, D, r], ...}
              (`lora.flatten_adapters`: "<weight path>.a" [L, in..., r], ".b" [L, r, out...])
    manifest.json   sha256 of every file orbax wrote (`integrity`), checked on load
```

    save_adapters(run_dir / "adapters", adapters, lora_cfg, base_model_dir=model_dir)
    ckpt = load_adapters(run_dir / "adapters")      # adapters, cfg, base dir and fingerprint
    check_base(ckpt, model_dir)                     # ValueError if model_dir is another base
    weights = with_adapters(params, ckpt.adapters, ckpt.cfg)

Adapters mean nothing without their base, so lora.json records the base's directory and
`model_fingerprint` (a cheap hash of its config and weight files); `check_base` refuses a
different base in one line. The arrays use the same orbax machinery as a model's params/.
A save is built in a hidden sibling directory and renamed into place, so a reader sees the
old directory or the complete new one, never a half-written one. A load checks the arrays'
files against their manifest and the values for NaN and inf (AdapterError naming them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from vlmgym_model.integrity import (
    CheckpointIntegrityError,
    nonfinite_host,
    verify_manifest,
    write_manifest,
    write_text_atomic,
)
from vlmgym_model.lora import LoraConfig, LoraPair, flatten_adapters, unflatten_adapters

FORMAT_VERSION = 1
CONFIG_FILE = "lora.json"
ARRAYS_DIR = "arrays"
SAMPLE_BYTES = 64 * 1024  # bytes hashed at each sampled offset of a weight file
SAMPLE_STRIDE = 64 * 1024**2  # distance between sampled offsets
_KEYS = (
    "format_version",
    "rank",
    "alpha",
    "targets",
    "use_rslora",
    "base_model_dir",
    "base_fingerprint",
)


class AdapterError(ValueError):
    """An adapter directory that cannot be read, or that belongs to another base model."""


@dataclasses.dataclass(frozen=True)
class AdapterCheckpoint:
    """What `load_adapters` returns.

    adapters: {weight path: LoraPair(a float32[L, in..., r], b float32[L, r, out...])},
      host (numpy) arrays.
    cfg: the rank, alpha, targets and rslora switch they were trained with.
    base_model_dir: the base model directory given to `save_adapters` (absolute).
    base_fingerprint: `model_fingerprint(base_model_dir)` at save time.
    """

    adapters: dict[str, LoraPair]
    cfg: LoraConfig
    base_model_dir: str
    base_fingerprint: str


def _sample_digest(path: Path, size: int) -> str:
    """sha256 of SAMPLE_BYTES at every SAMPLE_STRIDE-th byte of a file, and of its tail."""
    offsets = list(range(0, size, SAMPLE_STRIDE))
    tail = max(0, size - SAMPLE_BYTES)
    if tail not in offsets:
        offsets.append(tail)
    h = hashlib.sha256()
    with path.open("rb") as f:
        for offset in offsets:
            f.seek(offset)
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def model_fingerprint(model_dir: str | Path) -> str:
    """A cheap, content-dependent hash of a model directory's weights (16 hex digits).

    Hashes config.json's bytes and, for every file under params/, its relative name, its
    size and a sha256 of a strided sample of its bytes (64 KiB every 64 MiB, plus the last
    64 KiB), so a 16 GB checkpoint costs about 16 MiB of reads. The path of the directory
    does not enter: a copy (`cp -r`, rsync) has the fingerprint of its original.

    Detects: any edit of config.json; a weight file added, removed, renamed or resized; any
    change inside a sampled window (all of a file under 128 KiB); and in practice every
    re-save, since orbax names its data files afresh each time. Cannot detect: a same-size,
    in-place edit of a large file outside the sampled windows. It also tells apart two saves
    of the very same weights (e.g. converting one HF checkpoint twice): it identifies a
    saved copy of a base, not the values of its weights.
    """
    model_dir = Path(model_dir)
    config, params = model_dir / "config.json", model_dir / "params"
    if not config.is_file() or not params.is_dir():
        raise FileNotFoundError(
            f"{model_dir} is not a model directory (it needs config.json and params/)"
        )
    h = hashlib.sha256()
    raw = config.read_bytes()
    h.update(f"config.json\0{len(raw)}\0".encode())
    h.update(raw)
    for path in sorted(p for p in params.rglob("*") if p.is_file()):
        size = path.stat().st_size
        rel = path.relative_to(params).as_posix()
        h.update(f"\0{rel}\0{size}\0{_sample_digest(path, size)}".encode())
    return h.hexdigest()[:16]


def _check_pairs(adapters: dict[str, LoraPair], cfg: LoraConfig, where: str) -> None:
    """Every adapter is a target of `cfg`, with rank-r factors of one layer count."""
    if not adapters:
        raise AdapterError(f"{where}: no adapters")
    for path, pair in adapters.items():
        if path not in cfg.paths:
            raise AdapterError(f"{where}: adapter {path!r} is not among the targets {cfg.targets}")
        if not isinstance(pair, LoraPair):  # a weight trained whole
            if cfg.paths[path] != 0:
                raise AdapterError(f"{where}: {path!r} is adapted, but a whole weight was saved")
            continue
        a, b = np.shape(pair.a), np.shape(pair.b)
        if len(a) < 3 or len(b) < 3 or a[-1] != cfg.rank or b[1] != cfg.rank or a[0] != b[0]:
            raise AdapterError(
                f"{where}: adapter {path!r} has a {list(a)} and b {list(b)}; expected "
                f"a [L, in..., {cfg.rank}] and b [L, {cfg.rank}, out...]"
            )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def _save_arrays(path: Path, flat: dict[str, np.ndarray]) -> None:
    """Orbax save of host arrays by this process alone (as `checkpoint.save_params`)."""
    import jax
    import orbax.checkpoint as ocp

    options = ocp.options.MultiprocessingOptions()
    if jax.process_count() > 1:
        me = jax.process_index()
        options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    with ocp.StandardCheckpointer(multiprocessing_options=options) as ckptr:
        ckptr.save(path.absolute(), flat)


def save_adapters(
    directory: str | Path,
    adapters: dict[str, LoraPair],
    cfg: LoraConfig,
    base_model_dir: str | Path,
    *,
    force: bool = False,
) -> Path:
    """Write an adapter directory (see the module doc) and return its path.

    Args:
      adapters: {weight path: LoraPair}; host arrays or arrays this process can read
        whole (in a multi-process run, gather them and call from one process). Stored as
        float32.
      cfg: the LoRA settings they were trained with.
      base_model_dir: the model directory they were trained on (fingerprinted now).
      force: replace an existing directory.
    """
    import jax

    directory = Path(directory).absolute()
    if directory.exists() and not force:
        raise FileExistsError(f"{directory} exists; pass force=True to overwrite it")
    _check_pairs(adapters, cfg, "save_adapters")
    base = Path(base_model_dir).absolute()
    meta = {
        "format_version": FORMAT_VERSION,
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "targets": list(cfg.targets),
        "use_rslora": cfg.use_rslora,
        "base_model_dir": str(base),
        "base_fingerprint": model_fingerprint(base),
    }
    flat = {
        name: np.asarray(jax.device_get(x), np.float32)
        for name, x in flatten_adapters(adapters).items()
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = directory.with_name(f".{directory.name}.tmp-{tag}")
    old = directory.with_name(f".{directory.name}.old-{tag}")
    try:
        tmp.mkdir()
        _save_arrays(tmp / ARRAYS_DIR, flat)
        write_manifest(tmp / ARRAYS_DIR)
        _write_json(tmp / CONFIG_FILE, meta)
        if directory.exists():
            directory.rename(old)
        os.replace(tmp, directory)
    except BaseException:
        if old.exists() and not directory.exists():
            old.rename(directory)  # put the previous save back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return directory


def _read_meta(directory: Path) -> tuple[LoraConfig, dict[str, Any]]:
    """lora.json, checked: (its LoraConfig, the raw object)."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(
            f"{directory} has no {CONFIG_FILE}: not an adapter directory (a model trained "
            "without LoRA has none)"
        )
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(meta, dict):
        raise AdapterError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    missing = [k for k in _KEYS if k not in meta]
    if missing:
        raise AdapterError(f"{path} lacks {', '.join(missing)}")
    if meta["format_version"] != FORMAT_VERSION:
        raise AdapterError(
            f"{path} has format_version {meta['format_version']!r}; this version reads "
            f"{FORMAT_VERSION}"
        )
    targets, rslora = meta["targets"], meta["use_rslora"]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise AdapterError(f"{path}: targets must be a list of names, got {targets!r}")
    if not isinstance(rslora, bool):
        raise AdapterError(f"{path}: use_rslora must be true or false, got {rslora!r}")
    try:
        cfg = LoraConfig(meta["rank"], float(meta["alpha"]), tuple(targets), rslora)
    except (TypeError, ValueError) as err:
        raise AdapterError(f"{path}: {err}") from err
    return cfg, meta


def load_adapters(directory: str | Path) -> AdapterCheckpoint:
    """Read an adapter directory written by `save_adapters` (arrays as host float32).

    Raises AdapterError (a ValueError) naming the problem: no such directory, no or a
    corrupt lora.json, missing or unreadable arrays, arrays that do not fit lora.json.
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise AdapterError(f"adapter directory {directory} does not exist")
    cfg, meta = _read_meta(directory)
    arrays = directory / ARRAYS_DIR
    if not arrays.is_dir():
        raise AdapterError(f"{directory} has no {ARRAYS_DIR}/ checkpoint (interrupted copy?)")
    try:
        verify_manifest(arrays)
    except CheckpointIntegrityError as err:
        raise AdapterError(f"cannot read the adapter arrays in {arrays}: {err}") from err
    try:
        with ocp.StandardCheckpointer() as ckptr:
            flat = ckptr.restore(arrays)
    except Exception as err:  # orbax re-raises TensorStore's errors as a plain Exception
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AdapterError(f"cannot read the adapter arrays in {arrays}: {first}") from err
    host = {n: np.asarray(x, np.float32) for n, x in flat.items()}
    bad = nonfinite_host(host)
    if bad:
        raise AdapterError(f"{arrays}: non-finite values (NaN or inf) in {', '.join(bad)}")
    try:
        adapters = unflatten_adapters(host)
    except ValueError as err:
        raise AdapterError(f"{arrays}: {err}") from err
    _check_pairs(adapters, cfg, str(arrays))
    return AdapterCheckpoint(
        adapters, cfg, str(meta["base_model_dir"]), str(meta["base_fingerprint"])
    )


def check_base(ckpt: AdapterCheckpoint, model_dir: str | Path) -> None:
    """Raise AdapterError unless `model_dir` has the fingerprint the adapters recorded."""
    found = model_fingerprint(model_dir)
    if found != ckpt.base_fingerprint:
        raise AdapterError(
            f"adapters were trained on base {ckpt.base_model_dir} (fingerprint "
            f"{ckpt.base_fingerprint}), not {Path(model_dir).absolute()} (fingerprint {found})"
        )
