"""Convert HF Qwen2.5-VL safetensors checkpoints to vlm-gym model directories and back."""

from vlmgym_convert.convert import ConversionError, check_hf_tensors, hf_to_jax, jax_to_hf

__all__ = ["ConversionError", "check_hf_tensors", "hf_to_jax", "jax_to_hf"]
