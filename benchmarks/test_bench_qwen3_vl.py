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

from typing import Any

import jax
import numpy as np
import pytest
import torch
from conftest import TowerAndPrefill, median_seconds
from fixtures.hf_models import build_hf_model
from vlmgym_model import Sampler, SamplingParams

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


class Setup(TowerAndPrefill):
    def __init__(self, root: Any) -> None:
        super().__init__(build_hf_model(qwen3_vl_4b_shaped(), std=0.02), root, GRID, 150_000)
        length = self.ids.shape[1]
        self.sampler = Sampler(self.config, stop_token_ids=[-1], length_buckets=(length,))

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
                **self.hf_inputs(), do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW,
                pad_token_id=0,
            )  # fmt: skip
        return out[0, self.ids.shape[1] :].numpy()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return Setup(tmp_path_factory.mktemp("bench-qwen3-vl"))


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
