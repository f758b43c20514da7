"""Qwen-VL models in JAX (Qwen2-VL, Qwen2.5-VL, Qwen3-VL dense): config, weights, forward
pass, processor, sampler, checkpoints, sharding.

Public API (imported lazily, so `import vlmgym_model` does no work and pulls in JAX only
when a JAX-backed name is first used):
- `load_model(model_dir, dtype, mesh, rules) -> (config, params)`, `save_model` (atomic,
  with a manifest of hashes checked on load: `CheckpointIntegrityError`)
- `forward(params, config, input_ids, attention_mask, pixel_values, image_grid_thw)`
- `ModelInputs` (ids, segment ids, mRoPE positions, `ImageInputs`), built on the host by
  `model_inputs`; `embed(params, config, inputs)` is where every forward pass starts
  (the vision tower, its features written over the image placeholders): sampling's
  prefill, `forward_tokens` and training's `completion_logprobs` all call it
- `Qwen2_5_VLConfig` (also `QwenVLConfig`; + `TextConfig`, `VisionConfig`), read from HF's
  config.json; its `model_type` is the family (`FAMILIES`), the rest architecture switches
- `Processor` (tokenizer + chat template + images), `preprocess_images`
- `Sampler`, `SamplingParams`: batched generation with a KV cache and group sampling
- `TokenPrompt`, `encode_conversations`, `continuation`, `pad_prompts`: multi-turn prompts
  continued token-exactly (the sampled tokens and the env's new messages, never re-rendered)
- `completion_logprobs(params, config, CompletionInputs, CompletionStatics)`: training's
  forward pass (log-probs and entropies of completions, each prompt run once per group);
  `token_logprobs` (chunked log-softmax), `compute_logprobs` (jitted, no gradients)
- `ShardingRules`, `make_mesh`: logical axes -> the ("data", "fsdp", "tensor") mesh
- `LoraConfig`, `init_adapters`, `with_adapters`, `merge_adapters`: LoRA adapters as a
  pytree beside the weights; `save_adapters`, `load_adapters`, `model_fingerprint`
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # LoRA adapter directories
    "AdapterCheckpoint": "vlmgym_model.adapters",
    "AdapterError": "vlmgym_model.adapters",
    "check_base": "vlmgym_model.adapters",
    "load_adapters": "vlmgym_model.adapters",
    "model_fingerprint": "vlmgym_model.adapters",
    "save_adapters": "vlmgym_model.adapters",
    # checkpoints
    "CheckpointIntegrityError": "vlmgym_model.integrity",
    "load_model": "vlmgym_model.checkpoint",
    "load_params": "vlmgym_model.checkpoint",
    "save_model": "vlmgym_model.checkpoint",
    "save_params": "vlmgym_model.checkpoint",
    # config
    "ConfigError": "vlmgym_model.qwen2_5_vl.config",
    "FAMILIES": "vlmgym_model.qwen2_5_vl.config",
    "QwenVLConfig": "vlmgym_model.qwen2_5_vl.config",
    "Qwen2_5_VLConfig": "vlmgym_model.qwen2_5_vl.config",
    "TextConfig": "vlmgym_model.qwen2_5_vl.config",
    "VisionConfig": "vlmgym_model.qwen2_5_vl.config",
    # model
    "FeaturePlacement": "vlmgym_model.qwen2_5_vl.model",
    "ImageFeatures": "vlmgym_model.qwen2_5_vl.model",
    "ImageInputs": "vlmgym_model.qwen2_5_vl.model",
    "image_features": "vlmgym_model.qwen2_5_vl.model",
    "ModelInputs": "vlmgym_model.qwen2_5_vl.model",
    "Qwen2_5_VLWeights": "vlmgym_model.qwen2_5_vl.model",
    "embed": "vlmgym_model.qwen2_5_vl.model",
    "forward": "vlmgym_model.qwen2_5_vl.model",
    "forward_tokens": "vlmgym_model.qwen2_5_vl.model",
    "image_inputs": "vlmgym_model.qwen2_5_vl.model",
    "model_inputs": "vlmgym_model.qwen2_5_vl.model",
    "init_random_params": "vlmgym_model.qwen2_5_vl.model",
    "param_specs": "vlmgym_model.qwen2_5_vl.model",
    "get_rope_index": "vlmgym_model.qwen2_5_vl.rope",
    # training's forward pass
    "CompletionInputs": "vlmgym_model.logprobs",
    "CompletionStatics": "vlmgym_model.logprobs",
    "completion_logprobs": "vlmgym_model.logprobs",
    "compute_logprobs": "vlmgym_model.logprobs",
    "token_logprobs": "vlmgym_model.logprobs",
    "einsum": "vlmgym_model.matmul",
    "vision_layout": "vlmgym_model.qwen2_5_vl.vision",
    # LoRA
    "LoraConfig": "vlmgym_model.lora",
    "LoraPair": "vlmgym_model.lora",
    "LoraWeight": "vlmgym_model.lora",
    "adapter_specs": "vlmgym_model.lora",
    "init_adapters": "vlmgym_model.lora",
    "merge_adapters": "vlmgym_model.lora",
    "with_adapters": "vlmgym_model.lora",
    # processing
    "Processor": "vlmgym_model.processing",
    "compile_chat_template": "vlmgym_model.chat_template",
    "load_chat_template": "vlmgym_model.chat_template",
    "ImageProcessor": "vlmgym_model.qwen2_5_vl.image_processing",
    "ImageProcessorConfig": "vlmgym_model.qwen2_5_vl.image_processing",
    "preprocess_images": "vlmgym_model.qwen2_5_vl.image_processing",
    "smart_resize": "vlmgym_model.qwen2_5_vl.image_processing",
    # sampling
    "Generation": "vlmgym_model.sampling",
    "Sample": "vlmgym_model.sampling",
    "Sampler": "vlmgym_model.sampling",
    "default_length_buckets": "vlmgym_model.sampling",
    "SamplingParams": "vlmgym_model.sampling",
    # multi-turn prompts as exact tokens
    "TokenPrompt": "vlmgym_model.turns",
    "continuation": "vlmgym_model.turns",
    "encode_conversations": "vlmgym_model.turns",
    "pad_prompts": "vlmgym_model.turns",
    # command lines and the host
    "parse_args": "vlmgym_model.cli",
    "flag": "vlmgym_model.cli",
    "is_large_checkpoint": "vlmgym_model.host_malloc",
    "malloc_in_use": "vlmgym_model.host_malloc",
    "tune_for_checkpoint": "vlmgym_model.host_malloc",
    "tune_glibc_malloc": "vlmgym_model.host_malloc",
    "write_tiny_model": "vlmgym_model.tiny",
    # sharding and weights
    "MESH_AXES": "vlmgym_model.sharding",
    "ShardingRules": "vlmgym_model.sharding",
    "make_mesh": "vlmgym_model.sharding",
    "ParamSpec": "vlmgym_model.weights",
    "abstract_params": "vlmgym_model.weights",
    "dotted_path": "vlmgym_model.weights",
    "param_shardings": "vlmgym_model.weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vlmgym_model' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
