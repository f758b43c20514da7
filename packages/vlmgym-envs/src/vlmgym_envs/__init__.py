"""Environments and rewards for RL on vision-language models (pure Python, no JAX)."""
