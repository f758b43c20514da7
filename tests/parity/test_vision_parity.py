"""The JAX vision tower and multimodal forward against HF's Qwen2.5-VL, in fp32.

One tiny random model ("tied_gqa2" text, "windowed" vision: 2x2-unit windows, full attention
in blocks 1 and 3 of 4) with HF's large-init perturbation, so window and position bugs move
the outputs far past the tolerance. Images are random patches with grids that do (8x8
patches = 2x2 windows) and do not (6x10, 4x14) divide into whole windows.

HF gets `mm_token_type_ids` (1 on image placeholders) and `attention_mask` in every call:
without the former, transformers 5 silently falls back to 1D positions (see
`test_hf_needs_mm_token_type_ids`). Inputs are built here, not by the processor. Few distinct
shapes keep the compiles (which dominate on 2 cores) down: the tower test and the padded
batches share P = 180 patches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from fixtures.hf_models import (
    IMAGE_TOKEN_ID,
    VISION_END_TOKEN_ID,
    VISION_START_TOKEN_ID,
    VOCAB_SIZE,
)
from fixtures.parity_io import assert_rope_index_matches_hf, pad_rows
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index
from vlmgym_convert import jax_to_hf
from vlmgym_convert.safetensors_io import open_checkpoint
from vlmgym_model import forward
from vlmgym_model.qwen2_5_vl import vision

TEXT, VISION = "tied_gqa2", "windowed"
# (t, h, w) in patches. A: 4x4 merge units = 2x2 whole windows; B: 3x5 units and C: 2x7
# units leave partial windows; B and C are not square.
GRIDS = {"A": (1, 8, 8), "B": (1, 6, 10), "C": (1, 4, 14)}


@pytest.fixture(scope="module")
def model(converted) -> Any:
    return converted(TEXT, VISION)


def pixels_for(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Random patches ([sum t*h*w, 1176]) and grids ([n, 3]) for the named images."""
    grids = np.array([GRIDS[n] for n in names], np.int64)
    pieces = [
        np.random.default_rng(ord(n)).normal(size=(int(np.prod(GRIDS[n])), 1176)) for n in names
    ]
    return np.concatenate(pieces).astype(np.float32), grids


def image_run(name: str) -> list[int]:
    t, h, w = GRIDS[name]
    return [VISION_START_TOKEN_ID] + [IMAGE_TOKEN_ID] * (t * h * w // 4) + [VISION_END_TOKEN_ID]


def build_row(rng: np.random.Generator, parts: list[int | str]) -> list[int]:
    """An int is that many random text tokens, a str an image (start, placeholders, end)."""
    row: list[int] = []
    for part in parts:
        row += image_run(part) if isinstance(part, str) else rng.integers(0, 240, part).tolist()
    return row


def hf_logits(
    hf_model: Any,
    ids: np.ndarray,
    mask: np.ndarray,
    pixels: np.ndarray | None,
    grids: np.ndarray | None,
    *,
    with_token_types: bool = True,
) -> np.ndarray:
    kwargs: dict[str, Any] = {
        "input_ids": torch.as_tensor(ids),
        "attention_mask": torch.as_tensor(mask),
    }
    if pixels is not None:
        kwargs["pixel_values"] = torch.as_tensor(pixels)
        kwargs["image_grid_thw"] = torch.as_tensor(grids)
    if with_token_types:
        kwargs["mm_token_type_ids"] = torch.as_tensor((ids == IMAGE_TOKEN_ID).astype(np.int64))
    with torch.no_grad():
        return hf_model(**kwargs).logits.float().numpy()


def assert_logits_match(ours: Any, ref: np.ndarray, mask: np.ndarray, atol: float) -> float:
    """Compare at real tokens (logits at padding are not meaningful); return the max error."""
    ours = np.asarray(ours)
    assert ours.shape == ref.shape == (*mask.shape, VOCAB_SIZE)
    real = mask == 1
    np.testing.assert_allclose(ours[real], ref[real], atol=atol, rtol=0)
    assert np.abs(ref[real]).max() > 1.0, "logits this small could hide errors"
    return float(np.abs(ours[real] - ref[real]).max())


# ---------------------------------------------------------------- layout and rotary


@pytest.mark.parametrize(
    "grids",
    [[(1, 8, 8)], [(1, 6, 10), (1, 4, 14)], [(1, 8, 8), (2, 4, 6), (1, 16, 2)], [(1, 2, 2)]],
    ids=["whole-windows", "partial-windows", "mixed-with-frames", "one-unit"],
)
def test_layout_matches_hf(model, grids):
    """Window permutation, window and frame boundaries, and rotary ids equal HF's."""
    cfg = model.config.vision
    g = torch.as_tensor(grids)
    index, cu_windows = get_vision_window_index(
        g, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size
    )
    layout = vision.vision_layout(np.array(grids), cfg)
    np.testing.assert_array_equal(layout.window_index, index.numpy())
    np.testing.assert_array_equal(layout.window_index[layout.unit_inverse], np.arange(len(index)))

    def boundaries(segments: np.ndarray) -> np.ndarray:
        return np.concatenate([[0], np.flatnonzero(np.diff(segments)) + 1, [len(segments)]])

    np.testing.assert_array_equal(boundaries(layout.window_segments), cu_windows.numpy())
    frames = np.repeat([h * w for t, h, w in grids], [t for t, _, _ in grids])
    np.testing.assert_array_equal(
        boundaries(layout.image_segments), np.concatenate([[0], np.cumsum(frames)])
    )
    hf_rows_cols = get_vision_position_ids(g, cfg.spatial_merge_size).numpy()  # HF order
    np.testing.assert_array_equal(layout.positions, hf_rows_cols[layout.patch_order])
    assert layout.max_window_len >= np.diff(cu_windows.numpy()).max()
    assert layout.max_image_len >= frames.max()


def test_rotary_matches_hf(model, tol):
    cfg = model.config.vision
    _, grids = pixels_for(["A", "B"])
    rows_cols = get_vision_position_ids(torch.as_tensor(grids), cfg.spatial_merge_size)
    with torch.no_grad():
        ref_cos, ref_sin = model.hf_model.model.visual.rotary_pos_emb(
            torch.zeros(1), rows_cols
        )  # [P, H], HF order
    layout = vision.vision_layout(grids, cfg)
    cos, sin = vision.rotary_cos_sin(jnp.asarray(layout.positions), cfg)  # window order
    np.testing.assert_allclose(np.asarray(cos), ref_cos.numpy()[layout.patch_order], atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin), ref_sin.numpy()[layout.patch_order], atol=1e-6)


# ---------------------------------------------------------------- the tower


def test_vision_tower_matches_hf(model, tol):
    pixels, grids = pixels_for(["A", "B", "C"])
    with torch.no_grad():
        ref = model.hf_model.model.visual(torch.as_tensor(pixels), grid_thw=torch.as_tensor(grids))
    hidden, features, _ = vision.run_vision_tower(
        model.params.vision, model.config.vision, pixels, grids
    )
    ref_hidden, ref_features = ref.last_hidden_state.numpy(), ref.pooler_output.numpy()
    assert features.shape == (180 // 4, model.config.text.hidden_size)
    assert features.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(hidden), ref_hidden, atol=tol["float32"], rtol=0)
    np.testing.assert_allclose(np.asarray(features), ref_features, atol=tol["float32"], rtol=0)
    assert np.abs(ref_features).max() > 1.0


# ---------------------------------------------------------------- whole-model logits


def test_logits_one_image(model, tol):
    rng = np.random.default_rng(0)
    ids, mask = pad_rows([build_row(rng, [5, "A", 4])], "right")
    pixels, grids = pixels_for(["A"])
    ours = forward(model.params, model.config, ids, mask, pixels, grids)
    assert_logits_match(
        ours, hf_logits(model.hf_model, ids, mask, pixels, grids), mask, tol["float32"]
    )


def nlvr2_inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One sample with two images of different shapes (the NLVR2 shape)."""
    rng = np.random.default_rng(1)
    ids, mask = pad_rows([build_row(rng, [3, "A", 2, "B", 6])], "right")
    pixels, grids = pixels_for(["A", "B"])
    return ids, mask, pixels, grids


def test_logits_two_images_one_sample(model, tol):
    ids, mask, pixels, grids = nlvr2_inputs()
    ours = forward(model.params, model.config, ids, mask, pixels, grids)
    ref = hf_logits(model.hf_model, ids, mask, pixels, grids)
    assert_logits_match(ours, ref, mask, tol["float32"])


def batch_inputs(side: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Three rows with 0, 1 and 2 images of different sizes, padded on `side`."""
    rng = np.random.default_rng(2)
    rows = [
        build_row(rng, [9]),
        build_row(rng, [2, "B", 3]),
        build_row(rng, [4, "A", 1, "C", 2]),
    ]
    ids, mask = pad_rows(rows, side)
    pixels, grids = pixels_for(["B", "A", "C"])
    return ids, mask, pixels, grids


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_padded_batch(model, tol, side):
    ids, mask, pixels, grids = batch_inputs(side)
    assert (mask == 0).any(axis=1).sum() == 2, "two rows must be padded"
    ours = forward(model.params, model.config, ids, mask, pixels, grids)
    ref = hf_logits(model.hf_model, ids, mask, pixels, grids)
    assert_logits_match(ours, ref, mask, tol["float32"])


@pytest.mark.parametrize("side", ["left", "right"])
def test_rope_index_matches_hf(model, side):
    """mRoPE positions [3, B, T] and decode deltas equal HF's `get_rope_index`."""
    ids, mask, _, grids = batch_inputs(side)
    positions = assert_rope_index_matches_hf(model.hf_model, model.config, ids, mask, grids)
    assert (positions[1] != positions[2]).any(), "image tokens must have distinct h and w ids"


def test_hf_needs_mm_token_type_ids(model, tol):
    """The reference's trap: without mm_token_type_ids, HF uses 1D positions (other logits)."""
    ids, mask, pixels, grids = nlvr2_inputs()
    with_types = hf_logits(model.hf_model, ids, mask, pixels, grids)
    without = hf_logits(model.hf_model, ids, mask, pixels, grids, with_token_types=False)
    assert np.abs(with_types - without).max() > 100 * tol["float32"]


def _replace(config: Any, part: str, **changes: Any) -> Any:
    return dataclasses.replace(
        config, **{part: dataclasses.replace(getattr(config, part), **changes)}
    )


@pytest.mark.parametrize(
    ("part", "change"),
    [
        ("vision", {"window_size": 112}),
        ("vision", {"fullatt_block_indexes": (0, 2)}),
        ("text", {"mrope_section": (3, 3, 2)}),
    ],
    ids=["window_size", "fullatt_block_indexes", "mrope_section"],
)
def test_wrong_settings_fail(model, tol, part, change):
    """The comparison can fail: each wrong setting moves logits far past the tolerance."""
    ids, mask, pixels, grids = nlvr2_inputs()
    wrong = _replace(model.config, part, **change)
    assert wrong != model.config
    ours = np.asarray(forward(model.params, wrong, ids, mask, pixels, grids))
    ref = hf_logits(model.hf_model, ids, mask, pixels, grids)
    assert np.abs(ours - ref).max() > 100 * tol["float32"]


# ---------------------------------------------------------------- converter round trip


def test_round_trip_keeps_vision(model, tmp_path):
    """HF -> JAX -> HF: every vision tensor survives, and image logits are unchanged."""
    out = jax_to_hf(model.model_dir, tmp_path / "exported", progress=False)
    original, exported = open_checkpoint(model.hf_dir), open_checkpoint(out)
    vision_keys = [k for k in original if ".visual." in k or k.startswith("visual.")]
    assert len(vision_keys) > 10
    assert set(exported) == set(original)
    for key in vision_keys:
        np.testing.assert_array_equal(exported[key].get(key), original[key].get(key), key)
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).float().eval()
    assert reloaded.config.vision_config.window_size == model.hf_config.vision_config.window_size
    assert list(reloaded.config.vision_config.fullatt_block_indexes) == [1, 3]
    ids, mask, pixels, grids = nlvr2_inputs()
    np.testing.assert_array_equal(
        hf_logits(reloaded, ids, mask, pixels, grids),
        hf_logits(model.hf_model, ids, mask, pixels, grids),
    )


@pytest.mark.parametrize("impl", ["reference", "pallas_interpret"])
def test_every_attention_impl_matches_hf(model, tol, impl):
    """The model's parity holds with each attention implementation selected: text
    (causal, padded) and vision (windows and full blocks) attention both go through it."""
    rng = np.random.default_rng(7)
    ids, mask = pad_rows([build_row(rng, [3, "A", 2]), build_row(rng, [4])], "left")
    pixels, grids = pixels_for(["A"])
    ours = forward(model.params, model.config, ids, mask, pixels, grids, impl=impl)
    assert_logits_match(
        ours, hf_logits(model.hf_model, ids, mask, pixels, grids), mask, tol["float32"]
    )
