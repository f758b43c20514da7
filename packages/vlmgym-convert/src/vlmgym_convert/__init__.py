"""Convert HF Qwen-VL safetensors checkpoints to vlm-gym model directories and back, and
export LoRA adapters to PEFT's layout."""

from vlmgym_convert.convert import ConversionError, check_hf_tensors, hf_to_jax, jax_to_hf
from vlmgym_convert.peft_export import jax_to_peft

__all__ = ["ConversionError", "check_hf_tensors", "hf_to_jax", "jax_to_hf", "jax_to_peft"]
