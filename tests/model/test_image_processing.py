"""Qwen2.5-VL image preprocessing: our numpy + Pillow path against HF's `Qwen2VLImageProcessorPil`.

Grids must match exactly and pixel values within the "image" tolerance (they match bit for bit in
practice), over sizes below min_pixels, above max_pixels, extreme aspect ratios and every PIL mode
that needs an RGB conversion.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    smart_resize as hf_smart_resize,
)
from vlmgym_model.qwen2_5_vl.image_processing import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageProcessor,
    ImageProcessorConfig,
    preprocess_images,
    smart_resize,
)

QWEN_MIN_PIXELS = 3136
QWEN_MAX_PIXELS = 12845056


def hf_processor(min_pixels: int = QWEN_MIN_PIXELS, max_pixels: int = QWEN_MAX_PIXELS):
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def hf_preprocess(images, min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS):
    out = hf_processor(min_pixels, max_pixels)(images, return_tensors="np")
    return np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])


def random_image(rng: np.random.Generator, height: int, width: int, mode: str = "RGB"):
    data = rng.integers(0, 256, size=(height, width, 4), dtype=np.uint8)
    if mode == "RGB":
        return Image.fromarray(data[..., :3])
    if mode == "RGBA":
        return Image.fromarray(data, "RGBA")
    if mode == "L":
        return Image.fromarray(data[..., 0])
    if mode == "LA":
        return Image.fromarray(data[..., :2], "LA")
    if mode == "P":
        return Image.fromarray(data[..., :3]).quantize(colors=64)
    if mode == "P-transparent":
        image = Image.fromarray(data[..., :3]).quantize(colors=16)
        image.info["transparency"] = 3
        return image
    if mode == "1":
        return Image.fromarray(data[..., 0]).convert("1")
    if mode == "I;16":
        return Image.fromarray(data[..., 0].astype(np.uint16) * 200)
    if mode == "CMYK":
        return Image.fromarray(data, "RGBA").convert("CMYK")
    raise ValueError(mode)


def assert_matches_hf(ours, theirs, tol):
    pixel_values, grid = ours
    hf_pixel_values, hf_grid = theirs
    np.testing.assert_array_equal(grid, hf_grid)
    assert pixel_values.dtype == np.float32
    assert pixel_values.shape == hf_pixel_values.shape
    np.testing.assert_allclose(pixel_values, hf_pixel_values, rtol=0, atol=tol["image"])


# Sizes chosen to hit every branch of smart_resize: exact multiples of 28, round-half-to-even
# ties (14, 42, 70 are odd multiples of 14), below min_pixels, above max_pixels, thin strips.
SIZES = [
    (448, 448),
    (1024, 768),
    (28, 28),
    (1, 1),  # far below min_pixels
    (10, 37),
    (14, 42),  # rounding ties
    (70, 98),
    (55, 57),
    (333, 500),
    (2000, 30),  # tall strip
    (16, 3000),  # aspect ratio 187.5, just under the limit
    (1500, 1100),  # above max_pixels when the bound is lowered below
]


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_rgb_sizes_match_hf(tol, height, width):
    rng = np.random.default_rng(height * 10007 + width)
    image = random_image(rng, height, width)
    max_pixels = 28 * 28 * 1280  # HF's Qwen2-VL default: caps the largest sizes above
    ours = preprocess_images([image], max_pixels=max_pixels)
    assert_matches_hf(ours, hf_preprocess([image], max_pixels=max_pixels), tol)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "P-transparent", "1", "I;16", "CMYK"])
def test_pil_modes_match_hf(tol, mode):
    image = random_image(np.random.default_rng(7), 123, 217, mode)
    assert image.mode == mode.split("-")[0]
    assert_matches_hf(preprocess_images([image]), hf_preprocess([image]), tol)


def test_rgba_composites_onto_white():
    # A fully transparent image is white after conversion, whatever its colour channels hold.
    data = np.zeros((56, 56, 4), np.uint8)
    data[..., :3] = 17
    pixel_values, _ = preprocess_images([Image.fromarray(data, "RGBA")])
    config = ImageProcessorConfig()
    white = (1.0 - np.asarray(config.image_mean, np.float32)) / np.asarray(
        config.image_std, np.float32
    )
    per_channel = pixel_values.reshape(-1, 3, 2 * 14 * 14)
    np.testing.assert_allclose(
        per_channel, np.broadcast_to(white[None, :, None], per_channel.shape)
    )


def test_huge_image_is_capped_by_max_pixels(tol):
    image = random_image(np.random.default_rng(3), 2400, 1800)
    max_pixels = 500_000
    ours = preprocess_images([image], max_pixels=max_pixels)
    assert_matches_hf(ours, hf_preprocess([image], max_pixels=max_pixels), tol)
    _, grid = ours
    assert grid[0, 1] * grid[0, 2] * 14 * 14 <= max_pixels


def test_tiny_image_is_raised_to_min_pixels(tol):
    image = random_image(np.random.default_rng(4), 5, 9)
    ours = preprocess_images([image], min_pixels=28 * 28 * 9)
    assert_matches_hf(ours, hf_preprocess([image], min_pixels=28 * 28 * 9), tol)
    assert ours[1][0, 1] * ours[1][0, 2] * 14 * 14 >= 28 * 28 * 9


def test_batch_of_mixed_images_matches_hf(tol):
    rng = np.random.default_rng(11)
    images = [
        random_image(rng, 448, 448),
        random_image(rng, 37, 300, "L"),
        random_image(rng, 640, 480, "RGBA"),
        random_image(rng, 90, 91, "P"),
    ]
    assert_matches_hf(preprocess_images(images), hf_preprocess(images), tol)


def test_numpy_inputs_match_hf(tol):
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, size=(150, 260, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, size=(150, 260, 4), dtype=np.uint8)
    grey = rng.integers(0, 256, size=(150, 260, 1), dtype=np.uint8)
    for array in (rgb, rgba, grey):
        assert_matches_hf(preprocess_images([array]), hf_preprocess([array]), tol)
    # A numpy RGB array and the same image as PIL give identical outputs.
    for a, b in zip(
        preprocess_images([rgb]), preprocess_images([Image.fromarray(rgb)]), strict=True
    ):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=25, deadline=None)
@given(
    height=st.integers(1, 700),
    width=st.integers(1, 700),
    mode=st.sampled_from(["RGB", "L", "RGBA"]),
    seed=st.integers(0, 2**16),
)
def test_random_sizes_match_hf(tol, height, width, mode, seed):
    if max(height, width) / min(height, width) > 200:
        return
    image = random_image(np.random.default_rng(seed), height, width, mode)
    max_pixels = 200_000
    ours = preprocess_images([image], max_pixels=max_pixels)
    theirs = hf_preprocess([image], max_pixels=max_pixels)
    np.testing.assert_array_equal(ours[1], theirs[1])
    np.testing.assert_allclose(ours[0], theirs[0], rtol=0, atol=tol["image"])


@settings(max_examples=300, deadline=None)
@given(
    height=st.integers(1, 20000),
    width=st.integers(1, 20000),
    min_pixels=st.sampled_from([1, 3136, 28 * 28 * 4, 100_000]),
    max_pixels=st.sampled_from([3136, 200_000, 1003520, 12845056]),
)
def test_smart_resize_matches_hf(height, width, min_pixels, max_pixels):
    if max(height, width) / min(height, width) > 200:
        with pytest.raises(ValueError, match="aspect ratio"):
            smart_resize(height, width, 28, min_pixels, max_pixels)
        return
    ours = smart_resize(height, width, 28, min_pixels, max_pixels)
    assert ours == hf_smart_resize(height, width, 28, min_pixels, max_pixels)
    assert ours[0] % 28 == 0 and ours[1] % 28 == 0


def test_grid_helpers_agree_with_hf():
    processor = ImageProcessor()
    hf = hf_processor()
    for height, width in [(448, 448), (1024, 768), (5000, 4000), (10, 10), (30, 2000)]:
        t, h, w = processor.grid_thw(height, width)
        assert t == 1
        assert h * w == hf.get_number_of_image_patches(height, width)
        assert processor.num_image_tokens(height, width) == h * w // 4


def test_patch_order_is_merge_units_then_channel_time_row_col():
    # Encode each pixel's position in its value: channel 0 = row, 1 = column (mod 256).
    height, width = 56, 84  # grid 4 x 6 patches, 2 x 3 merge units
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    data = np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype(np.uint8)
    config = ImageProcessorConfig(do_normalize=False, do_rescale=False)
    pixel_values, grid = ImageProcessor(config)([data])
    np.testing.assert_array_equal(grid, [[1, 4, 6]])
    patches = pixel_values.reshape(4 * 6, 3, 2, 14, 14)  # [P, C, T, p, p]
    np.testing.assert_array_equal(patches[:, :, 0], patches[:, :, 1])  # two identical frames
    k = 0
    for unit_row in range(2):
        for unit_col in range(3):
            for inner_row in range(2):
                for inner_col in range(2):
                    top = (unit_row * 2 + inner_row) * 14
                    left = (unit_col * 2 + inner_col) * 14
                    np.testing.assert_array_equal(
                        patches[k, 0, 0], rows[top : top + 14, left : left + 14]
                    )
                    np.testing.assert_array_equal(
                        patches[k, 1, 0], cols[top : top + 14, left : left + 14]
                    )
                    k += 1


def test_threads_and_serial_agree():
    rng = np.random.default_rng(9)
    images = [random_image(rng, int(h), int(w)) for h, w in rng.integers(20, 400, size=(6, 2))]
    serial = ImageProcessor(num_threads=1)(images)
    threaded = ImageProcessor(num_threads=4)(images)
    for a, b in zip(serial, threaded, strict=True):
        np.testing.assert_array_equal(a, b)


def test_outputs_shapes_and_dtypes():
    rng = np.random.default_rng(1)
    pixel_values, grid = preprocess_images(
        [random_image(rng, 448, 448), random_image(rng, 56, 112)]
    )
    assert pixel_values.shape == (32 * 32 + 4 * 8, 1176)
    assert pixel_values.dtype == np.float32
    assert grid.dtype == np.int64
    np.testing.assert_array_equal(grid, [[1, 32, 32], [1, 4, 8]])
    # A single image is accepted without a list; an empty list gives empty arrays.
    single, _ = preprocess_images(random_image(rng, 56, 56))
    assert single.shape == (16, 1176)
    empty, empty_grid = preprocess_images([])
    assert empty.shape == (0, 1176) and empty_grid.shape == (0, 3)


def test_config_defaults_are_qwen2_5_vl():
    config = ImageProcessorConfig()
    assert (config.min_pixels, config.max_pixels) == (QWEN_MIN_PIXELS, QWEN_MAX_PIXELS)
    assert (config.patch_size, config.temporal_patch_size, config.merge_size) == (14, 2, 2)
    assert config.image_mean == OPENAI_CLIP_MEAN and config.image_std == OPENAI_CLIP_STD
    assert config.patch_dim == 1176 and config.factor == 28


def test_config_reads_both_preprocessor_layouts(tmp_path):
    legacy = {"min_pixels": 1000, "max_pixels": 50000, "patch_size": 14, "merge_size": 2}
    newer = {"size": {"shortest_edge": 1000, "longest_edge": 50000}}
    both = {
        "size": {"shortest_edge": 1, "longest_edge": 2},
        "min_pixels": 1000,
        "max_pixels": 50000,
    }
    for layout in (legacy, newer, both):
        config = ImageProcessorConfig.from_dict(layout)
        assert (config.min_pixels, config.max_pixels) == (1000, 50000)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(newer))
    assert ImageProcessorConfig.from_model_dir(tmp_path).max_pixels == 50000
    assert ImageProcessorConfig.from_model_dir(tmp_path / "missing") == ImageProcessorConfig()


def test_config_from_file_matches_hf_from_pretrained(tmp_path, tol):
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(
            {"size": {"shortest_edge": 6272, "longest_edge": 90000}, "rescale_factor": 1 / 255}
        )
    )
    image = random_image(np.random.default_rng(2), 600, 410)
    ours = ImageProcessor.from_model_dir(tmp_path)([image])
    hf = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)(image, return_tensors="np")
    assert_matches_hf(ours, (hf["pixel_values"], hf["image_grid_thw"]), tol)


def test_invalid_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="aspect ratio"):
        preprocess_images([np.zeros((10, 2500, 3), np.uint8)])
    with pytest.raises(TypeError, match="uint8"):
        preprocess_images([np.zeros((30, 30, 3), np.float32)])
    with pytest.raises(ValueError, match=r"\[H, W, C\]"):
        preprocess_images([np.zeros((30, 30, 2), np.uint8)])
    with pytest.raises(TypeError, match="PIL images"):
        preprocess_images(["not an image"])
    with pytest.raises(ValueError, match="min_pixels"):
        ImageProcessorConfig(min_pixels=100, max_pixels=10)
