"""Convert HF safetensors checkpoints to vlm-gym JAX checkpoints and back."""
