"""Qwen3-VL at the 4B text widths: vision tower, vision + prefill, and greedy decode against
HF transformers (torch) on the same random weights, fp32 on CPU.

The model: Qwen3-VL-4B's decoder widths (hidden 2560, 32 query / 8 key-value heads of 128,
MLP 9728, 151,936-token tied vocabulary) with 4 of its 36 layers, and its vision tower's
widths (1024, 16 heads, MLP 4096, patch 16, a 48 x 48 position table) with 6 of its 24
blocks, DeepStack from blocks 1, 3 and 5. One 512x512 image (grid 1x32x32 = 1024 patches,
256 merged tokens) in a ~300-token prompt. Each stage times HF in the same process and
records `extra_info["speedup_vs_hf"]` (HF median / our median, after our compilation).

Run: uv run pytest benchmarks/test_bench_qwen3_vl.py --benchmark-columns=median -s
(about 4 minutes and 8 GB on 2 CPU cores).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from fixtures.hf_models import build_hf_model
from vlmgym_convert import hf_to_jax
from vlmgym_model import Sampler, SamplingParams, forward, load_model
from vlmgym_model.qwen2_5_vl import vision

IMAGE, START, END = 151655, 151652, 151653
GRID = (1, 32, 32)
NEW = 16


def qwen3_vl_4b_shaped() -> Any:
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=151_936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=4,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "mrope_section": [24, 20, 20],
                             "mrope_interleaved": True, "rope_theta": 5_000_000.0},
            bos_token_id=None, eos_token_id=None, pad_token_id=None,
        ),
        vision_config=dict(
            depth=6, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
            out_hidden_size=2560, num_position_embeddings=2304, deepstack_visual_indexes=[1, 3, 5],
        ),
        tie_word_embeddings=True,
    )  # fmt: skip


class Setup:
    def __init__(self, root: Any) -> None:
        self.hf_model = build_hf_model(qwen3_vl_4b_shaped(), std=0.02)
        self.hf_model.save_pretrained(root / "hf")
        hf_to_jax(root / "hf", root / "jax", progress=False)
        self.config, self.params = load_model(root / "jax", dtype=jnp.float32)
        rng = np.random.default_rng(0)
        P = int(np.prod(GRID))
        self.pixels = rng.normal(size=(P, self.config.vision.patch_dim)).astype(np.float32)
        self.grids = np.array([GRID])
        text = rng.integers(0, 150_000, 42).tolist()
        row = text[:20] + [START] + [IMAGE] * (P // 4) + [END] + text[20:]
        self.ids = np.array([row])
        self.mask = np.ones_like(self.ids)
        self.sampler = Sampler(self.config, stop_token_ids=[-1], length_buckets=(len(row),))

    def hf_kwargs(self) -> dict[str, Any]:
        return dict(
            input_ids=torch.as_tensor(self.ids),
            attention_mask=torch.as_tensor(self.mask),
            pixel_values=torch.as_tensor(self.pixels),
            image_grid_thw=torch.as_tensor(self.grids),
            mm_token_type_ids=torch.as_tensor((self.ids == IMAGE).astype(np.int64)),
        )

    def ours_tower(self) -> np.ndarray:
        out = vision.encode_images(self.params.vision, self.config.vision, self.pixels, self.grids)
        return np.asarray(jax.block_until_ready(out))

    def hf_tower(self) -> np.ndarray:
        with torch.no_grad():
            out = self.hf_model.model.visual(
                torch.as_tensor(self.pixels), grid_thw=torch.as_tensor(self.grids)
            )
        return out.pooler_output.numpy()

    def ours_prefill(self) -> np.ndarray:
        out = forward(self.params, self.config, self.ids, self.mask, self.pixels, self.grids)
        return np.asarray(jax.block_until_ready(out))[0, -1]

    def hf_prefill(self) -> np.ndarray:
        with torch.no_grad():
            return self.hf_model(**self.hf_kwargs()).logits.numpy()[0, -1]

    def ours_generate(self) -> np.ndarray:
        gen = self.sampler.generate_ids(
            self.params, self.ids, self.mask, SamplingParams(max_new_tokens=NEW, temperature=0),
            jax.random.key(0), pixel_values=self.pixels, image_grid_thw=self.grids,
            decode_text=False,
        )  # fmt: skip
        return np.asarray(gen.samples[0][0].tokens)

    def hf_generate(self) -> np.ndarray:
        with torch.no_grad():
            out = self.hf_model.generate(
                **self.hf_kwargs(), do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW,
                pad_token_id=0,
            )  # fmt: skip
        return out[0, self.ids.shape[1] :].numpy()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return Setup(tmp_path_factory.mktemp("bench-qwen3-vl"))


def median_seconds(fn: Any, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@pytest.mark.parametrize("stage", ["tower", "prefill", "generate"])
def test_bench_qwen3_vl_vs_hf(benchmark, setup, stage):
    ours, hf = getattr(setup, f"ours_{stage}"), getattr(setup, f"hf_{stage}")
    benchmark.group = f"Qwen3-VL 4B-wide, {stage}, 1 x 512x512"
    ours()  # compile outside the timing
    got = benchmark.pedantic(ours, rounds=3, warmup_rounds=0)
    ref = hf()
    if stage == "generate":
        assert got.tolist() == ref.tolist(), "greedy tokens must agree"
    else:
        assert np.abs(got - ref).max() <= 1e-3 * max(1.0, np.abs(ref).max())
    hf_median = median_seconds(hf)
    ours_median = benchmark.stats.stats.median
    benchmark.extra_info["hf_median_s"] = hf_median
    benchmark.extra_info["speedup_vs_hf"] = hf_median / ours_median
    print(
        f"\n{stage}: ours {ours_median * 1e3:.0f} ms, HF {hf_median * 1e3:.0f} ms, "
        f"speed-up x{hf_median / ours_median:.2f}"
    )
