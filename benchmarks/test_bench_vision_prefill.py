"""Vision tower and vision + prefill latency: our JAX forward against HF transformers (torch).

One mid-sized random Qwen2.5-VL (vision: 8 blocks of width 256, 4 heads, the published
112-pixel windows, full attention in blocks 3 and 7; text: 4 layers of width 256) and one
448x448 image (grid 1x32x32 = 1024 patches, 256 merged tokens) in a 300-token prompt, fp32
on CPU. Two groups: the tower alone, and the whole prefill forward (tower, placeholder
scatter, mRoPE, decoder, logits). Each `ours` run also times HF in the same process and
records `extra_info["speedup_vs_hf"]` (HF median / our median). Our timings are after
compilation (the warm-up call compiles).

Run: uv run pytest benchmarks/test_bench_vision_prefill.py --benchmark-columns=median,ops -s
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import pytest
from conftest import TowerAndPrefill
from fixtures.hf_models import (
    build_hf_model,
    hf_config,
)

TEXT = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    mrope_section=[8, 12, 12],
    tie_word_embeddings=True,
)
VISION = dict(
    depth=8,
    hidden_size=256,
    intermediate_size=512,
    num_heads=4,
    fullatt_block_indexes=[3, 7],
    window_size=112,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
)
GRID = (1, 32, 32)  # a 448x448 image


class Setup(TowerAndPrefill):
    def __init__(self, root: Any) -> None:
        super().__init__(build_hf_model(hf_config(TEXT, VISION), std=0.02), root, GRID, 240)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return Setup(tmp_path_factory.mktemp("bench-vision"))


def median_seconds(fn: Any, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


STAGES = ("tower", "prefill")


@pytest.mark.parametrize("stage", STAGES)
def test_bench_ours(benchmark, setup, stage):
    ours, hf = getattr(setup, f"ours_{stage}"), getattr(setup, f"hf_{stage}")
    benchmark.group = f"vision {stage}, 1 x 448x448"
    ours()  # compile outside the timing
    got = benchmark.pedantic(ours, rounds=5, warmup_rounds=1)
    ref = hf()
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, scale), "the runs must compute the same"
    hf_median = median_seconds(hf)
    ours_median = benchmark.stats.stats.median
    benchmark.extra_info["hf_median_s"] = hf_median
    benchmark.extra_info["speedup_vs_hf"] = hf_median / ours_median
    print(
        f"\n{stage}: ours {ours_median * 1e3:.1f} ms, HF {hf_median * 1e3:.1f} ms, "
        f"speed-up x{hf_median / ours_median:.2f}"
    )


@pytest.mark.parametrize("stage", STAGES)
def test_bench_hf(benchmark, setup, stage):
    benchmark.group = f"vision {stage}, 1 x 448x448"
    benchmark.pedantic(getattr(setup, f"hf_{stage}"), rounds=5, warmup_rounds=1)
