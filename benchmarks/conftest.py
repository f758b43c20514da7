"""Shared benchmark models: a random ~0.5B-sized Qwen2.5-VL, in HF torch and in JAX.

The text shape is Qwen2.5-0.5B's (24 layers, width 896, 14 heads / 2 kv heads, vocab
151,936, tied embeddings); the vision tower is Qwen2.5-VL's, cut to 4 blocks. Weights are
random (nothing is downloaded); HF and JAX run the same weights, converted by our converter.

Run: uv run pytest benchmarks/ --benchmark-columns=median,ops
Results are ratios against the reference measured in the same process (`extra_info`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

QWEN05B_TEXT = dict(
    vocab_size=151_936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_parameters={
        "rope_type": "default",
        "type": "mrope",
        "mrope_section": [8, 12, 12],
        "rope_theta": 1_000_000.0,
    },
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
VISION_4_BLOCKS = dict(
    depth=4,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    out_hidden_size=896,
    fullatt_block_indexes=[3],
    window_size=112,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
)


def median_seconds(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of fn() after warm-up calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class BenchModel:
    def __init__(self, root: Path) -> None:
        import jax.numpy as jnp
        import torch
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        from vlmgym_convert import hf_to_jax
        from vlmgym_model import load_model

        torch.manual_seed(0)
        self.hf_config = Qwen2_5_VLConfig(
            text_config=QWEN05B_TEXT,
            vision_config=VISION_4_BLOCKS,
            tie_word_embeddings=True,
            image_token_id=151655,
            video_token_id=151656,
            vision_start_token_id=151652,
            vision_end_token_id=151653,
        )
        self.hf_model = Qwen2_5_VLForConditionalGeneration(self.hf_config).float().eval()
        self.hf_dir = root / "hf"
        self.hf_model.save_pretrained(self.hf_dir)
        self.model_dir = root / "jax"
        hf_to_jax(self.hf_dir, self.model_dir, progress=False)
        self.config, self.params = load_model(self.model_dir, dtype=jnp.float32)


@pytest.fixture(scope="session")
def qwen05b(tmp_path_factory: pytest.TempPathFactory) -> BenchModel:
    return BenchModel(tmp_path_factory.mktemp("qwen05b"))
