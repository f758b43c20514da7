"""Qwen2.5-VL: config, vision tower, text decoder, mRoPE."""
