"""Qwen2.5-VL in JAX: config, weights, forward pass, checkpoints and sharding rules.

Public API:
- `load_model(model_dir, dtype, mesh, rules) -> (config, params)`
- `forward(params, config, input_ids, attention_mask, pixel_values, image_grid_thw)`
- `Qwen2_5_VLConfig` (+ `TextConfig`, `VisionConfig`), read from HF's config.json
- `ShardingRules`, `make_mesh`: logical axes -> the ("data", "fsdp", "tensor") mesh
"""

from vlmgym_model.checkpoint import load_model, load_params, save_model, save_params
from vlmgym_model.qwen2_5_vl.config import (
    ConfigError,
    Qwen2_5_VLConfig,
    TextConfig,
    VisionConfig,
)
from vlmgym_model.qwen2_5_vl.model import (
    Qwen2_5_VLWeights,
    forward,
    init_random_params,
    param_specs,
)
from vlmgym_model.qwen2_5_vl.rope import get_rope_index
from vlmgym_model.sharding import MESH_AXES, ShardingRules, make_mesh
from vlmgym_model.weights import ParamSpec, abstract_params, param_shardings

__all__ = [
    "MESH_AXES",
    "ConfigError",
    "ParamSpec",
    "Qwen2_5_VLConfig",
    "Qwen2_5_VLWeights",
    "ShardingRules",
    "TextConfig",
    "VisionConfig",
    "abstract_params",
    "forward",
    "get_rope_index",
    "init_random_params",
    "load_model",
    "load_params",
    "make_mesh",
    "param_shardings",
    "param_specs",
    "save_model",
    "save_params",
]
