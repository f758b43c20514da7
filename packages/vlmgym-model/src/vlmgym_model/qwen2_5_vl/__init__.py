"""The Qwen-VL families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL dense): config, vision tower, text
decoder, mRoPE. The package keeps its first family's name."""
