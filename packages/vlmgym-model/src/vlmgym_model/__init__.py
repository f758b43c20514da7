"""Qwen2.5-VL in JAX."""
