"""Image preprocessing throughput: our `preprocess_images` against HF's `Qwen2VLImageProcessorPil`.

Batches of 16 RGB images at 448x448 (already a multiple of 28: no resize) and 1024x768 (resized
to 1036x756), with Qwen2.5-VL's default pixel bounds. Each pair shares a benchmark group; the
`ours` run also records HF's median, timed in the same process, and the ratio
(`extra_info["speedup_vs_hf"]` = HF median / our median).

Run: uv run pytest benchmarks/test_bench_image_processing.py --benchmark-columns=median,ops
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest
from PIL import Image
from transformers import Qwen2VLImageProcessorPil
from vlmgym_model.qwen2_5_vl.image_processing import ImageProcessor

BATCH = 16
SIZES = {"448x448": (448, 448), "1024x768": (768, 1024)}  # name -> (height, width)
MIN_PIXELS, MAX_PIXELS = 3136, 12845056


def make_batch(height: int, width: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
        for _ in range(BATCH)
    ]


def hf_processor() -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def run_hf(processor: Qwen2VLImageProcessorPil, images: list[Image.Image]) -> np.ndarray:
    return processor(images, return_tensors="np")["pixel_values"]


def median_seconds(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@pytest.mark.parametrize("size", sorted(SIZES))
def test_bench_ours(benchmark, size):
    images = make_batch(*SIZES[size])
    processor = ImageProcessor()
    benchmark.group = f"preprocess 16 x {size}"
    pixel_values, _ = benchmark(processor, images)
    hf = hf_processor()
    np.testing.assert_allclose(pixel_values, run_hf(hf, images), rtol=0, atol=1e-5)
    hf_median = median_seconds(lambda: run_hf(hf, images))
    ours_median = benchmark.stats.stats.median
    benchmark.extra_info["hf_median_s"] = hf_median
    benchmark.extra_info["speedup_vs_hf"] = hf_median / ours_median
    print(
        f"\n{size}: ours {ours_median * 1e3:.1f} ms, HF {hf_median * 1e3:.1f} ms, "
        f"speed-up x{hf_median / ours_median:.2f}"
    )


@pytest.mark.parametrize("size", sorted(SIZES))
def test_bench_hf(benchmark, size):
    images = make_batch(*SIZES[size])
    processor = hf_processor()
    benchmark.group = f"preprocess 16 x {size}"
    benchmark(run_hf, processor, images)
