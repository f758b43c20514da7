"""Model directories: HF's config and tokenizer files beside an orbax checkpoint of params.

```
model_dir/
  config.json, generation_config.json     HF's, unchanged
  tokenizer.json, tokenizer_config.json   HF's, unchanged (chat template included)
  preprocessor_config.json                HF's, unchanged
  params/                                 orbax checkpoint of the params pytree
```

Params are stored as a flat mapping from dotted names (`text.layers.q_proj`) to arrays, so
a checkpoint does not depend on Python class layouts.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vlmgym_model.qwen2_5_vl.config import Qwen2_5_VLConfig
from vlmgym_model.qwen2_5_vl.model import Qwen2_5_VLWeights, param_specs
from vlmgym_model.sharding import ShardingRules
from vlmgym_model.weights import ParamSpec, dotted_path, is_spec, param_shardings

PARAMS_DIR = "params"


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


def save_params(path: str | Path, params: Qwen2_5_VLWeights, *, force: bool = False) -> None:
    """Write params as an orbax checkpoint at `path` (a directory it creates).

    In a multi-process run, global arrays are written by all processes together (each
    call is collective). Host arrays (numpy, or arrays on this process's devices only)
    are written by the calling process alone, without waiting for the others.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    flat = flatten_params(params)
    options = ocp.options.MultiprocessingOptions()
    local = all(not isinstance(a, jax.Array) or a.is_fully_addressable for a in flat.values())
    if jax.process_count() > 1 and local:
        me = jax.process_index()
        options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
        flat = {n: np.asarray(jax.device_get(a)) for n, a in flat.items()}
    if path.exists():
        if not force:
            raise FileExistsError(f"{path} exists; pass force=True to overwrite it")
        shutil.rmtree(path)
    with ocp.StandardCheckpointer(multiprocessing_options=options) as ckptr:
        ckptr.save(path, flat)


def load_params(
    path: str | Path,
    config: Qwen2_5_VLConfig,
    dtype: Any = jnp.bfloat16,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
) -> Qwen2_5_VLWeights:
    """Read params from an orbax checkpoint, cast to `dtype`, placed by `rules` on `mesh`."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"no params checkpoint at {path}")
    specs = param_specs(config)
    flat_specs: dict[str, ParamSpec] = flatten_params(specs, is_spec)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        flat_shardings = {n: device for n in flat_specs}
    else:
        flat_shardings = flatten_params(param_shardings(specs, mesh, rules))
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(path)
        stored_tree = getattr(stored, "item_metadata", stored)
        stored_tree = getattr(stored_tree, "tree", stored_tree)
        stored_names = set(stored_tree)
        missing = sorted(set(flat_specs) - stored_names)
        extra = sorted(stored_names - set(flat_specs))
        wrong = sorted(
            f"{n}: stored {tuple(stored_tree[n].shape)}, config wants {flat_specs[n].shape}"
            for n in set(flat_specs) & stored_names
            if tuple(stored_tree[n].shape) != flat_specs[n].shape
        )
        if missing or extra or wrong:
            raise ValueError(
                f"params at {path} do not match config.json: missing {missing or 'none'}; "
                f"unexpected {extra or 'none'}; wrong shapes {wrong or 'none'}"
            )
        target = {
            n: jax.ShapeDtypeStruct(s.shape, dtype, sharding=flat_shardings[n])
            for n, s in flat_specs.items()
        }
        flat = ckptr.restore(path, target)
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
    preprocessor files are copied unchanged (an HF checkpoint, or another model_dir).
    """
    import json

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    copied = copy_side_files(copy_files_from, model_dir) if copy_files_from else []
    if "config.json" not in copied:
        (model_dir / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    save_params(model_dir / PARAMS_DIR, params, force=force)


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


def copy_side_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy config, tokenizer, chat template and preprocessor files present in `src`."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied
