"""HF Qwen2.5-VL safetensors checkpoints <-> vlm-gym model directories."""

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
    copy_side_files,
    flatten_params,
    load_params,
    save_params,
    unflatten_params,
)
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
    every tensor against config.json, and writes `params/` with orbax plus unchanged copies
    of the config, generation config, tokenizer and preprocessor files.

    Args:
      dtype: dtype to store ("bfloat16", "float16", "float32"); default: the checkpoint's.
      force: overwrite an existing `params/` in model_dir.
    """
    hf_dir, model_dir = Path(hf_dir), Path(model_dir)
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
    shapes = {c: f.shape(n) for c, (n, f) in by_canonical.items()}
    plan = check_hf_tensors(config, shapes)
    target = parse_dtype(dtype)
    if (model_dir / PARAMS_DIR).exists() and not force:
        raise FileExistsError(f"{model_dir / PARAMS_DIR} exists; pass --force to overwrite")

    flat_specs = flatten_params(param_specs(config), is_spec)
    flat: dict[str, np.ndarray] = {}
    total = sum(len(names) for _, names in plan)
    with _progress(total, f"reading {hf_dir.name}", progress) as bar:
        for rule, names in plan:
            spec = flat_specs[rule.ours]
            out: np.ndarray | None = None
            for i, name in enumerate(names):
                orig, f = by_canonical[name]
                arr = f.get(orig)
                if out is None:
                    out = np.empty(spec.shape, target or arr.dtype)
                per_layer = spec.shape[1:] if rule.layered else spec.shape
                converted = to_ours(rule, arr, per_layer).astype(out.dtype, copy=False)
                if rule.layered:
                    out[i] = converted
                else:
                    out[...] = converted
                bar.update(1)
            flat[rule.ours] = out
    model_dir.mkdir(parents=True, exist_ok=True)
    copied = copy_side_files(hf_dir, model_dir)
    if "config.json" not in copied:
        raise ConversionError(f"{hf_dir} has no config.json")
    if progress:
        print(f"writing {model_dir / PARAMS_DIR} ...", file=sys.stderr)
    save_params(model_dir / PARAMS_DIR, unflatten_params(config, flat), force=force)
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


def jax_to_hf(
    model_dir: str | Path,
    hf_dir: str | Path,
    *,
    dtype: str | None = None,
    adapter_dir: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Export a vlm-gym model directory to HF safetensors that transformers loads.

    Writes `model.safetensors` (or shards plus `model.safetensors.index.json`) in the
    published tensor naming, and copies config, tokenizer and preprocessor files (config.json
    is written from the config when the model directory has none).

    Args:
      dtype: dtype to write; default: the dtype the params are stored in.
      adapter_dir: LoRA adapters trained on this model (`vlmgym_model.save_adapters`), merged
        into the weights (W + scale * A @ B, in float32, then cast to `dtype`).
    """
    import jax

    model_dir, hf_dir = Path(model_dir), Path(hf_dir)
    config = Qwen2_5_VLConfig.from_file(model_dir / "config.json")
    stored = _stored_dtype(model_dir / PARAMS_DIR)
    target = parse_dtype(dtype) or stored
    if adapter_dir is None:
        params = load_params(model_dir / PARAMS_DIR, config, dtype=target)
    else:  # merged into the stored weights, so the cast to `target` happens once
        ckpt = load_export_adapters(model_dir, adapter_dir, config)
        params = load_params(model_dir / PARAMS_DIR, config, dtype=stored)
        params = merge_adapters(params, ckpt.adapters, ckpt.cfg)
    flat = flatten_params(params)
    flat_specs = flatten_params(param_specs(config), is_spec)
    plan = [(r, r.hf_names(flat_specs[r.ours].shape[0] if r.layered else 1)) for r in rules(config)]
    total = sum(len(names) for _, names in plan)
    hf_dir.mkdir(parents=True, exist_ok=True)

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        with _progress(total, f"writing {hf_dir.name}", progress) as bar:
            for rule, names in plan:
                host = np.asarray(jax.device_get(flat[rule.ours])).astype(target, copy=False)
                for i, name in enumerate(names):
                    per_layer = host[i] if rule.layered else host
                    shape = hf_shape(rule, per_layer.shape, config)
                    out = np.ascontiguousarray(to_hf(rule, per_layer, shape))
                    yield published_hf_name(name, config), out
                    bar.update(1)

    shards = list(_shards(tensors(), max_shard_bytes))
    for old in hf_dir.glob("model*.safetensors*"):
        old.unlink()
    if len(shards) == 1:
        write_safetensors(hf_dir / "model.safetensors", shards[0])
    else:
        weight_map, total_size = {}, 0
        for k, shard in enumerate(shards):
            filename = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(hf_dir / filename, shard)
            for name, arr in shard:
                weight_map[name] = filename
                total_size += arr.nbytes
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    copied = copy_side_files(model_dir, hf_dir)
    if "config.json" not in copied:
        (hf_dir / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    return hf_dir


def _stored_dtype(params_dir: Path) -> np.dtype:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(params_dir.absolute())
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return np.dtype(next(iter(tree.values())).dtype)


def download_hf_repo(repo_id: str, revision: str | None = None) -> Path:
    """Download a hub checkpoint's safetensors, config and tokenizer files; return its dir."""
    from huggingface_hub import snapshot_download

    path = snapshot_download(
        repo_id,
        revision=revision,
        allow_patterns=["*.safetensors", "*.json", "*.jinja", "merges.txt", "vocab.json"],
    )
    return Path(path)
