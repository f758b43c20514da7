"""Model directories: HF's config and tokenizer files beside an orbax checkpoint of params.

```
model_dir/
  config.json, generation_config.json     HF's, unchanged
  tokenizer.json, tokenizer_config.json   HF's, unchanged (chat template included)
  preprocessor_config.json                HF's, unchanged
  params/                                 orbax checkpoint of the params pytree
    manifest.json                         sha256 of every file orbax wrote (`integrity`)
```

Params are stored as a flat mapping from dotted names (`text.layers.q_proj`) to arrays, so
a checkpoint does not depend on Python class layouts.

Saves are atomic: params/ is built in a hidden sibling (`.params.tmp-1a2b3c4d`) and renamed
into place, the files beside it are written to temporary names and renamed after it, so a
crash or a full disk leaves the previous model whole. Loads check the manifest before
orbax reads a byte and the restored values for NaN and inf; both fail with a one-line
`CheckpointIntegrityError` (a ValueError) naming the file or tensor. A params/ without a
manifest (saved before manifests existed) loads with a logged warning.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vlmgym_model.integrity import (
    CheckpointIntegrityError,
    check_finite,
    fsync_dir,
    remove_temp,
    replace_dir,
    temp_sibling,
    verify_manifest,
    write_manifest,
)
from vlmgym_model.qwen2_5_vl.config import Qwen2_5_VLConfig
from vlmgym_model.qwen2_5_vl.model import Qwen2_5_VLWeights, param_specs
from vlmgym_model.sharding import ShardingRules
from vlmgym_model.weights import ParamSpec, dotted_path, is_spec, param_shardings

PARAMS_DIR = "params"
# What orbax raises on files it cannot parse: JSON and UTF-8 errors (ValueErrors), TensorStore's
# DATA_LOSS and OUT_OF_RANGE (ValueErrors, re-raised by orbax's array reader as a plain
# Exception), KeyError and TypeError on well-formed JSON of another shape, OSError.
_ORBAX_ERRORS = (Exception,)


def flatten_params(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> dict[str, Any]:
    """A params (or spec) pytree as {dotted name: leaf}."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {dotted_path(path): leaf for path, leaf in leaves}


def unflatten_params(config: Qwen2_5_VLConfig, flat: dict[str, Any]) -> Qwen2_5_VLWeights:
    """Rebuild the params pytree from {dotted name: array}; names must match exactly."""
    specs = param_specs(config)
    names = list(flatten_params(specs, is_spec))
    missing = [n for n in names if n not in flat]
    extra = [n for n in flat if n not in set(names)]
    if missing or extra:
        raise ValueError(
            f"checkpoint does not match the config: missing {missing or 'none'}, "
            f"unexpected {extra or 'none'}"
        )
    treedef = jax.tree.structure(specs, is_leaf=is_spec)
    return jax.tree.unflatten(treedef, [flat[n] for n in names])


def _from_process_0(value: int) -> int:
    """Process 0's `value`, on every process (a collective)."""
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _commit_params(tmp: Path, path: Path, collective: bool) -> None:
    """Hash the finished checkpoint `tmp` into its manifest and rename it to `path` (process
    0 alone in a collective save; the others wait for its outcome and fail with it)."""
    error: BaseException | None = None
    if not collective or jax.process_index() == 0:
        try:
            write_manifest(tmp)
            replace_dir(tmp, path)
        except BaseException as err:
            remove_temp(tmp)
            error = err
    if collective and not _from_process_0(error is None) and error is None:
        raise OSError(f"process 0 could not finish saving {path}; see its log")
    if error is not None:
        raise error


def save_params(path: str | Path, params: Qwen2_5_VLWeights, *, force: bool = False) -> None:
    """Write params as an orbax checkpoint at `path` (a directory), with a manifest.

    The checkpoint is written to a hidden sibling, hashed, and renamed into place; with
    force=True an existing `path` is deleted only once the new one is complete. A failure
    (e.g. OSError ENOSPC) leaves `path` as it was and no temporary directory behind.

    In a multi-process run, global arrays are written by all processes together (each
    call is collective; process 0 writes the manifest and renames, the others wait for
    it). Host arrays (numpy, or arrays on this process's devices only) are written by the
    calling process alone, without waiting for the others.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    flat = flatten_params(params)
    options = ocp.options.MultiprocessingOptions()
    local = all(not isinstance(a, jax.Array) or a.is_fully_addressable for a in flat.values())
    collective = jax.process_count() > 1 and not local
    if jax.process_count() > 1 and local:
        me = jax.process_index()
        options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
        flat = {n: np.asarray(jax.device_get(a)) for n, a in flat.items()}
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass force=True to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = _from_process_0(uuid.uuid4().int % 2**31) if collective else uuid.uuid4().int % 2**31
    tmp = path.with_name(f".{path.name}.tmp-{tag:08x}")
    try:
        with ocp.StandardCheckpointer(multiprocessing_options=options) as ckptr:
            ckptr.save(tmp, flat)
    except BaseException:
        remove_temp(tmp)
        raise
    _commit_params(tmp, path, collective)


def _orbax(path: Path, what: str, call: Callable[[], Any]) -> Any:
    """`call()`, with what orbax raises on unreadable files as a CheckpointIntegrityError."""
    try:
        return call()
    except _ORBAX_ERRORS as err:
        lines = str(err).strip().splitlines()
        detail = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
        raise CheckpointIntegrityError(
            f"cannot {what} the params checkpoint at {path} (corrupt or incomplete?): {detail}"
        ) from err


def _stored_arrays(ckptr: Any, path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{name: (shape, dtype)} of the arrays in an orbax checkpoint, from its metadata."""
    stored = ckptr.metadata(path)
    tree = getattr(stored, "item_metadata", stored)
    tree = getattr(tree, "tree", tree)
    return {
        str(n): (tuple(int(d) for d in m.shape), np.dtype(m.dtype)) for n, m in dict(tree).items()
    }


def load_params(
    path: str | Path,
    config: Qwen2_5_VLConfig,
    dtype: Any | None = jnp.bfloat16,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
) -> Qwen2_5_VLWeights:
    """Read params from an orbax checkpoint, cast to `dtype` (None: each array keeps its
    stored dtype), placed by `rules` on `mesh`.

    Raises CheckpointIntegrityError (a ValueError) naming the file or tensor when the files
    differ from their manifest, cannot be parsed, or hold NaN or inf; a ValueError when
    they do not match `config`.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"no params checkpoint at {path}")
    verify_manifest(path)
    specs = param_specs(config)
    flat_specs: dict[str, ParamSpec] = flatten_params(specs, is_spec)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        flat_shardings = {n: device for n in flat_specs}
    else:
        flat_shardings = flatten_params(param_shardings(specs, mesh, rules))
    with ocp.StandardCheckpointer() as ckptr:
        meta = _orbax(path, "read the metadata of", lambda: _stored_arrays(ckptr, path))
        stored = {n: shape for n, (shape, _) in meta.items()}
        missing = sorted(set(flat_specs) - set(stored))
        extra = sorted(set(stored) - set(flat_specs))
        wrong = sorted(
            f"{n}: stored {stored[n]}, config wants {flat_specs[n].shape}"
            for n in set(flat_specs) & set(stored)
            if stored[n] != flat_specs[n].shape
        )
        if missing or extra or wrong:
            raise ValueError(
                f"params at {path} do not match config.json: missing {missing or 'none'}; "
                f"unexpected {extra or 'none'}; wrong shapes {wrong or 'none'}"
            )
        target = {
            n: jax.ShapeDtypeStruct(s.shape, dtype or meta[n][1], sharding=flat_shardings[n])
            for n, s in flat_specs.items()
        }
        flat = _orbax(path, "restore", lambda: ckptr.restore(path, target))
    check_finite(flat, path)
    return unflatten_params(config, flat)


def load_model(
    model_dir: str | Path,
    dtype: Any = jnp.bfloat16,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
) -> tuple[Qwen2_5_VLConfig, Qwen2_5_VLWeights]:
    """Read a model directory: (config, params), params placed by `rules` when a mesh is given.

    `dtype` is the dtype of every weight (bfloat16 for inference; float32 for parity tests
    or fp32 master weights).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    config = Qwen2_5_VLConfig.from_file(model_dir / "config.json")
    params_dir = model_dir / PARAMS_DIR
    if not params_dir.is_dir():
        raise FileNotFoundError(
            f"{model_dir} has no {PARAMS_DIR}/ checkpoint; convert an HF checkpoint with "
            f"`vlmgym-convert --hf_dir HF_DIR --model_dir {model_dir}`"
        )
    return config, load_params(params_dir, config, dtype, mesh, rules)


def save_model(
    model_dir: str | Path,
    config: Qwen2_5_VLConfig,
    params: Qwen2_5_VLWeights,
    *,
    copy_files_from: str | Path | None = None,
    force: bool = False,
) -> None:
    """Write a model directory: config.json (unless copied), params/, and the HF side files.

    `copy_files_from`: a directory whose config, generation config, tokenizer and
    preprocessor files are copied unchanged (an HF checkpoint, or another model_dir); side
    files of an earlier model that it lacks are removed. The files are staged under
    temporary names and renamed into place after params/ (see the module doc).
    """
    model_dir = Path(model_dir)
    if (model_dir / PARAMS_DIR).exists() and not force:
        raise FileExistsError(f"{model_dir / PARAMS_DIR} exists; pass force=True to overwrite it")
    created = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    staged: dict[str, Path] = {}
    try:
        staged = stage_side_files(copy_files_from, model_dir, config)
        save_params(model_dir / PARAMS_DIR, params, force=force)
    except BaseException:
        discard_staged(staged)
        if created and not any(model_dir.iterdir()):
            model_dir.rmdir()
        raise
    commit_staged(staged, model_dir)
    if copy_files_from is not None:
        for name in SIDE_FILES:
            if name not in staged:
                (model_dir / name).unlink(missing_ok=True)


SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
)


def stage_side_files(
    src: str | Path | None, dst: str | Path, config: Qwen2_5_VLConfig | None = None
) -> dict[str, Path]:
    """Copy the side files present in `src` to hidden temporary names in `dst`, plus
    config.json written from `config` when `src` has none: {final name: temporary path}.
    `commit_staged` renames them into place, `discard_staged` deletes them."""
    dst = Path(dst)
    staged: dict[str, Path] = {}
    try:
        for name in SIDE_FILES if src is not None else ():
            if (Path(src) / name).is_file():
                staged[name] = temp_sibling(dst / name)
                shutil.copyfile(Path(src) / name, staged[name])
        if "config.json" not in staged and config is not None:
            staged["config.json"] = temp_sibling(dst / "config.json")
            staged["config.json"].write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
        for tmp in staged.values():
            with tmp.open("rb+") as f:
                os.fsync(f.fileno())
    except BaseException:
        discard_staged(staged)
        raise
    return staged


def commit_staged(staged: dict[str, Path], dst: str | Path) -> None:
    """Rename files staged by `stage_side_files` (or any {name: temporary path}) into `dst`."""
    for name, tmp in staged.items():
        os.replace(tmp, Path(dst) / name)
    fsync_dir(Path(dst))


def discard_staged(staged: dict[str, Path]) -> None:
    for tmp in staged.values():
        tmp.unlink(missing_ok=True)
