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


class TowerAndPrefill:
    """Our vision tower and prefill forward beside HF's, on the same weights and inputs.

    Subclasses set `hf_model`, `config`, `params`, `pixels`, `grids`, `ids` and `mask`.
    """

    hf_model: Any
    config: Any
    params: Any
    pixels: Any
    grids: Any
    ids: Any
    mask: Any

    def __init__(self, hf_model: Any, root: Path, grid: tuple[int, int, int], vocab: int) -> None:
        """Save `hf_model` under root, convert and load it (fp32), and build one prompt of
        20 + 22 random tokens (ids below `vocab`) around an image of patch grid `grid`."""
        import jax.numpy as jnp
        import numpy as np
        from vlmgym_convert import hf_to_jax
        from vlmgym_model import load_model

        self.hf_model = hf_model
        hf_model.save_pretrained(root / "hf")
        hf_to_jax(root / "hf", root / "jax", progress=False)
        self.config, self.params = load_model(root / "jax", dtype=jnp.float32)
        rng = np.random.default_rng(0)
        P = int(np.prod(grid))
        self.pixels = rng.normal(size=(P, self.config.vision.patch_dim)).astype(np.float32)
        self.grids = np.array([grid])
        c, text = self.config, rng.integers(0, vocab, 42).tolist()
        image = [c.vision_start_token_id] + [c.image_token_id] * (P // 4) + [c.vision_end_token_id]
        self.ids = np.array([text[:20] + image + text[20:]])
        self.mask = np.ones_like(self.ids)

    def hf_inputs(self) -> dict[str, Any]:
        import numpy as np
        import torch

        image = (self.ids == self.config.image_token_id).astype(np.int64)
        return dict(
            input_ids=torch.as_tensor(self.ids),
            attention_mask=torch.as_tensor(self.mask),
            pixel_values=torch.as_tensor(self.pixels),
            image_grid_thw=torch.as_tensor(self.grids),
            mm_token_type_ids=torch.as_tensor(image),
        )

    def ours_tower(self) -> Any:
        import jax
        import numpy as np
        from vlmgym_model.qwen2_5_vl import vision

        out = vision.encode_images(self.params.vision, self.config.vision, self.pixels, self.grids)
        return np.asarray(jax.block_until_ready(out))

    def hf_tower(self) -> Any:
        import torch

        with torch.no_grad():
            out = self.hf_model.model.visual(
                torch.as_tensor(self.pixels), grid_thw=torch.as_tensor(self.grids)
            )
        return out.pooler_output.numpy()

    def ours_prefill(self) -> Any:
        import jax
        import numpy as np
        from vlmgym_model import forward

        out = forward(self.params, self.config, self.ids, self.mask, self.pixels, self.grids)
        return np.asarray(jax.block_until_ready(out))

    def hf_prefill(self) -> Any:
        import torch

        with torch.no_grad():
            return self.hf_model(**self.hf_inputs()).logits.numpy()


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
