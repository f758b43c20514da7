"""HF Qwen2.5-VL safetensors checkpoints <-> vlm-gym model directories.

Both directions refuse an output directory that holds anything unless `force` is given,
and then write the new checkpoint under hidden temporary names first: the previous
checkpoint's files are replaced or removed only once the new ones are complete, so a full
disk or a crash leaves the old checkpoint whole. Every tensor read is checked: header
fields against the safetensors format (`safetensors_io`), names and shapes against
config.json, values for NaN and inf (by tensor); a model_dir's params/ against its sha256
manifest (`vlmgym_model.integrity`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from vlmgym_model.adapters import AdapterCheckpoint, check_base, load_adapters
from vlmgym_model.checkpoint import (
    PARAMS_DIR,
    SIDE_FILES,
    commit_staged,
    discard_staged,
    flatten_params,
    load_params,
    save_model,
    stage_side_files,
    unflatten_params,
)
from vlmgym_model.integrity import temp_sibling, write_text_atomic
from vlmgym_model.lora import LoraPair, adapter_specs, merge_adapters
from vlmgym_model.qwen2_5_vl.config import Qwen2_5_VLConfig
from vlmgym_model.qwen2_5_vl.model import param_specs
from vlmgym_model.weights import is_spec

from vlmgym_convert.mapping import (
    Rule,
    canonical_hf_name,
    hf_shape,
    published_hf_name,
    rules,
    to_hf,
    to_ours,
)
from vlmgym_convert.safetensors_io import (
    DTYPES,
    SafetensorsFile,
    open_checkpoint,
    write_safetensors,
)

DEFAULT_SHARD_BYTES = 4 * 1024**3
INDEX = "model.safetensors.index.json"
FLOAT_DTYPES = {DTYPES[k] for k in ("F64", "F32", "F16", "BF16")}


class ConversionError(ValueError):
    """A checkpoint whose tensors do not match its config.json."""


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, file=sys.stderr)


def parse_dtype(name: str | None) -> np.dtype | None:
    """The numpy dtype a `--dtype` spelling names (None: keep the source's)."""
    if name is None:
        return None
    table = {
        "bfloat16": "BF16",
        "bf16": "BF16",
        "float16": "F16",
        "fp16": "F16",
        "float32": "F32",
        "fp32": "F32",
    }
    if name.lower() not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {name!r}")
    return DTYPES[table[name.lower()]]


def check_hf_tensors(
    config: Qwen2_5_VLConfig, shapes: dict[str, tuple[int, ...]]
) -> list[tuple[Rule, list[str]]]:
    """Match every HF tensor to a rule; raise ConversionError listing every problem.

    Args:
      shapes: {canonical HF tensor name: shape}.

    Returns:
      The rules with their HF names per layer, in conversion order.
    """
    flat_specs = flatten_params(param_specs(config), is_spec)
    plan = []
    expected: set[str] = set()
    missing, wrong = [], []
    for rule in rules(config):
        spec = flat_specs[rule.ours]
        per_layer = spec.shape[1:] if rule.layered else spec.shape
        want = hf_shape(rule, per_layer, config)
        names = rule.hf_names(spec.shape[0] if rule.layered else 1)
        for name in names:
            expected.add(name)
            if name not in shapes:
                missing.append(name)
            elif tuple(shapes[name]) != want:
                wrong.append(f"{name}: checkpoint has {list(shapes[name])}, expected {list(want)}")
        plan.append((rule, names))
    ignorable = {"lm_head.weight"} if config.text.tie_word_embeddings else set()
    extra = sorted(n for n in shapes if n not in expected and n not in ignorable)
    if missing or extra or wrong:
        lines = ["the checkpoint does not match its config.json:"]
        if missing:
            lines.append(f"  missing tensors ({len(missing)}): " + ", ".join(missing))
        if extra:
            lines.append(f"  unmapped tensors ({len(extra)}): " + ", ".join(extra))
        if wrong:
            lines.append(f"  mis-shaped tensors ({len(wrong)}):\n    " + "\n    ".join(wrong))
        raise ConversionError("\n".join(lines))
    return plan


def check_output_dir(out: Path, force: bool, inputs: list[Path]) -> None:
    """Refuse an output directory that is one of the inputs, or that holds anything (the
    error names what) unless `force`."""
    for src in inputs:
        if out.exists() and src.exists() and out.resolve() == src.resolve():
            raise ConversionError(f"the output directory {out} is also an input; choose another")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and not force:
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
        if entries:
            shown = ", ".join(entries[:6]) + (f", ... ({len(entries)} in all)" * (len(entries) > 6))
            raise FileExistsError(
                f"{out} is not empty (it holds {shown}); pass --force to replace the "
                "checkpoint there"
            )


def _convert(
    rule: Rule, names: list[str], shape: tuple[int, ...], by_canonical: dict, target: Any
) -> np.ndarray:
    """One of our arrays (`shape`) from its HF tensors, each checked for NaN and inf."""
    out: np.ndarray | None = None
    per_layer = shape[1:] if rule.layered else shape
    for i, name in enumerate(names):
        orig, f = by_canonical[name]
        arr = f.get(orig)
        if out is None:
            out = np.empty(shape, target or arr.dtype)
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below
            converted = to_ours(rule, arr, per_layer).astype(out.dtype, copy=False)
        if not np.isfinite(converted).all():
            why = "holds NaN or inf" if not np.isfinite(arr).all() else f"overflows {out.dtype}"
            raise ConversionError(f"{f.path}: tensor {orig!r} {why}")
        if rule.layered:
            out[i] = converted
        else:
            out[...] = converted
    assert out is not None
    return out


def read_hf_checkpoint(
    hf_dir: str | Path, *, dtype: str | None = None, progress: bool = True
) -> tuple[Qwen2_5_VLConfig, dict[str, np.ndarray]]:
    """An HF Qwen-VL checkpoint's config and params as {dotted name: host array}.

    Raises SafetensorsError for files that break the format, ConversionError naming the
    tensors whose names, shapes or dtype (not floating point) do not fit config.json, or
    that hold NaN or inf (in the file, or after the cast to `dtype`).
    """
    hf_dir = Path(hf_dir)
    config = Qwen2_5_VLConfig.from_file(hf_dir / "config.json")
    files = open_checkpoint(hf_dir)
    by_canonical: dict[str, tuple[str, SafetensorsFile]] = {}
    for name, f in files.items():
        canonical = canonical_hf_name(name)
        if canonical in by_canonical:
            raise ConversionError(
                f"tensors {by_canonical[canonical][0]!r} and {name!r} both map to {canonical!r}"
            )
        by_canonical[canonical] = (name, f)
    plan = check_hf_tensors(config, {c: f.shape(n) for c, (n, f) in by_canonical.items()})
    not_float = [
        f"{n} ({f.dtype(n)})" for n, f in by_canonical.values() if f.dtype(n) not in FLOAT_DTYPES
    ]
    if not_float:
        raise ConversionError(f"{hf_dir}: weights must be floating point: {', '.join(not_float)}")
    target = parse_dtype(dtype)
    flat_specs = flatten_params(param_specs(config), is_spec)
    flat: dict[str, np.ndarray] = {}
    with _progress(sum(len(n) for _, n in plan), f"reading {hf_dir.name}", progress) as bar:
        for rule, names in plan:
            shape = flat_specs[rule.ours].shape
            flat[rule.ours] = _convert(rule, names, shape, by_canonical, target)
            bar.update(len(names))
    return config, flat


def hf_to_jax(
    hf_dir: str | Path,
    model_dir: str | Path,
    *,
    dtype: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> Qwen2_5_VLConfig:
    """Convert an HF Qwen-VL checkpoint (any family) into a vlm-gym model directory.

    Reads single-file or sharded safetensors (bf16, fp16 or fp32) without torch, checks
    every tensor (`read_hf_checkpoint`), and writes `params/` with orbax plus unchanged
    copies of the config, generation config, tokenizer and preprocessor files.

    Args:
      dtype: dtype to store ("bfloat16", "float16", "float32"); default: the checkpoint's.
      force: write into a `model_dir` that holds something, replacing the model there (the
        old files go only once the new ones are complete).
    """
    hf_dir, model_dir = Path(hf_dir), Path(model_dir)
    check_output_dir(model_dir, force, [hf_dir])
    config, flat = read_hf_checkpoint(hf_dir, dtype=dtype, progress=progress)
    if progress:
        print(f"writing {model_dir / PARAMS_DIR} ...", file=sys.stderr)
    params = unflatten_params(config, flat)
    save_model(model_dir, config, params, copy_files_from=hf_dir, force=force)
    return config


def _shards(
    tensors: Iterator[tuple[str, np.ndarray]], max_bytes: int
) -> Iterator[list[tuple[str, np.ndarray]]]:
    shard: list[tuple[str, np.ndarray]] = []
    size = 0
    for name, arr in tensors:
        if shard and size + arr.nbytes > max_bytes:
            yield shard
            shard, size = [], 0
        shard.append((name, arr))
        size += arr.nbytes
    if shard:
        yield shard


def load_export_adapters(
    model_dir: str | Path, adapter_dir: str | Path, config: Qwen2_5_VLConfig
) -> AdapterCheckpoint:
    """The adapters in `adapter_dir`, checked against the base model in `model_dir`: its
    fingerprint must be the one they were trained on, their shapes those its weights take.
    Raises a one-line AdapterError or ConversionError (both ValueErrors)."""
    ckpt = load_adapters(adapter_dir)
    check_base(ckpt, model_dir)
    want = adapter_specs(param_specs(config), ckpt.cfg)
    for path, pair in sorted(ckpt.adapters.items()):
        spec = want.get(path)
        if spec is None:
            raise ConversionError(f"{adapter_dir}: adapter {path!r} adapts no weight of the base")
        if isinstance(pair, LoraPair) != isinstance(spec, LoraPair):
            raise ConversionError(f"{adapter_dir}: {path!r} is not stored as its target needs")
        if isinstance(pair, LoraPair):
            got, expected = (pair.a.shape, pair.b.shape), (spec.a.shape, spec.b.shape)
        else:
            got, expected = np.shape(pair), spec.shape
        if got != expected:
            raise ConversionError(
                f"{adapter_dir}: adapter {path!r} has a, b shapes {got}; the base needs {expected}"
            )
    return ckpt


def _write_hf(
    hf_dir: Path, shards: list[list[tuple[str, np.ndarray]]], model_dir: Path, config: Any
) -> None:
    """Write the weights (one file, or shards and their index) and the side files under
    temporary names, then rename them into place and remove the weight and side files of a
    previous checkpoint that the new one lacks (the old index first)."""
    n = len(shards)
    names = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    )
    staged: dict[str, Path] = {}
    try:
        for name, shard in zip(names, shards, strict=True):
            staged[name] = temp_sibling(hf_dir / name)
            write_safetensors(staged[name], shard)
        if n > 1:
            weight_map = {
                t: name for name, shard in zip(names, shards, strict=True) for t, _ in shard
            }
            total = sum(arr.nbytes for shard in shards for _, arr in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            staged[INDEX] = temp_sibling(hf_dir / INDEX)
            write_text_atomic(staged[INDEX], json.dumps(index, indent=2) + "\n")
        staged.update(stage_side_files(model_dir, hf_dir, config))
    except BaseException:
        discard_staged(staged)
        raise
    stale = [p for p in hf_dir.glob("model*.safetensors*") if p.name not in staged]
    stale += [hf_dir / name for name in SIDE_FILES if name not in staged]
    commit_staged(staged, hf_dir)
    for path in sorted(stale, key=lambda p: p.name != INDEX):
        path.unlink(missing_ok=True)


def jax_to_hf(
    model_dir: str | Path,
    hf_dir: str | Path,
    *,
    dtype: str | None = None,
    adapter_dir: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Export a vlm-gym model directory to HF safetensors that transformers loads.

    Writes `model.safetensors` (or shards plus `model.safetensors.index.json`) in the
    published tensor naming, and copies config, tokenizer and preprocessor files (config.json
    is written from the config when the model directory has none).

    Args:
      dtype: dtype to write; default: the dtype the params are stored in.
      adapter_dir: LoRA adapters trained on this model (`vlmgym_model.save_adapters`), merged
        into the weights (W + scale * A @ B, in float32, then cast to `dtype`).
      force: write into an `hf_dir` that holds something, replacing the checkpoint there
        (its weight files go only once the new ones are complete; other files stay).
    """
    import jax

    model_dir, hf_dir = Path(model_dir), Path(hf_dir)
    check_output_dir(hf_dir, force, [model_dir, *([Path(adapter_dir)] if adapter_dir else [])])
    config = Qwen2_5_VLConfig.from_file(model_dir / "config.json")
    target = parse_dtype(dtype)
    if adapter_dir is None:  # restored in the dtype to write (None: the stored ones)
        params = load_params(model_dir / PARAMS_DIR, config, dtype=target)
    else:  # merged into the stored weights, so the cast to `target` happens once
        ckpt = load_export_adapters(model_dir, adapter_dir, config)
        params = load_params(model_dir / PARAMS_DIR, config, dtype=None)
        params = merge_adapters(params, ckpt.adapters, ckpt.cfg)
    flat = flatten_params(params)
    flat_specs = flatten_params(param_specs(config), is_spec)
    plan = [(r, r.hf_names(flat_specs[r.ours].shape[0] if r.layered else 1)) for r in rules(config)]
    total = sum(len(names) for _, names in plan)

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        with _progress(total, f"writing {hf_dir.name}", progress) as bar:
            for rule, names in plan:
                host = np.asarray(jax.device_get(flat[rule.ours]))
                host = host.astype(target or host.dtype, copy=False)
                if not np.isfinite(host).all():  # finite when loaded: merged or cast badly
                    raise ConversionError(
                        f"{rule.ours}: NaN or inf once merged or cast to {host.dtype}"
                    )
                for i, name in enumerate(names):
                    per_layer = host[i] if rule.layered else host
                    shape = hf_shape(rule, per_layer.shape, config)
                    out = np.ascontiguousarray(to_hf(rule, per_layer, shape))
                    yield published_hf_name(name, config), out
                    bar.update(1)

    shards = list(_shards(tensors(), max_shard_bytes))
    hf_dir.mkdir(parents=True, exist_ok=True)
    _write_hf(hf_dir, shards, model_dir, config)
    return hf_dir


def download_hf_repo(repo_id: str, revision: str | None = None) -> Path:
    """Download a hub checkpoint's safetensors, config and tokenizer files; return its dir."""
    from huggingface_hub import snapshot_download

    path = snapshot_download(
        repo_id,
        revision=revision,
        allow_patterns=["*.safetensors", "*.json", "*.jinja", "merges.txt", "vocab.json"],
    )
    return Path(path)
