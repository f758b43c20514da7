"""GRPO-family reinforcement learning for vision-language models."""
