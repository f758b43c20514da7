"""Qwen2-VL and Qwen3-VL against HF's `...ForConditionalGeneration`, in fp32.

Each family's tiny random model (`fixtures.hf_families`: odd sizes, large init) is saved
by HF, converted with `vlmgym_convert.hf_to_jax` and loaded with `load_model`, which reads
the family from config.json. The logits are compared on text-only rows, one image, two
images of different sizes in one row, and a batch mixing rows with and without images,
padded on either side; the vision tower's merged and DeepStack features are compared
directly. Negative checks show that a wrong interleaving, mRoPE split, DeepStack index or
position-table size moves the logits far past the tolerance.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from fixtures.hf_families import FAMILIES, PATCH, build_family_model, family_hf_config
from fixtures.hf_models import IMAGE_TOKEN_ID, VISION_END_TOKEN_ID, VISION_START_TOKEN_ID
from fixtures.parity_io import (
    assert_rope_index_matches_hf,
    hf_greedy,
    pad_rows,
    sharded_forward,
)
from vlmgym_convert import hf_to_jax, jax_to_hf
from vlmgym_convert.safetensors_io import open_checkpoint
from vlmgym_model import (
    ConfigError,
    Qwen2_5_VLConfig,
    Sampler,
    SamplingParams,
    forward,
    load_model,
)
from vlmgym_model.qwen2_5_vl import vision

GRIDS = {"A": (1, 8, 8), "B": (1, 6, 10), "C": (1, 4, 6)}


@dataclasses.dataclass
class Family:
    name: str
    hf_model: Any
    hf_dir: Path
    model_dir: Path
    config: Any
    params: Any


_CACHE: dict[str, Family] = {}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory) -> Family:
    name = request.param
    if name not in _CACHE:
        root = tmp_path_factory.mktemp(name)
        model = build_family_model(name)
        model.save_pretrained(root / "hf")
        hf_to_jax(root / "hf", root / "jax", progress=False)
        config, params = load_model(root / "jax", dtype=jnp.float32)
        _CACHE[name] = Family(name, model, root / "hf", root / "jax", config, params)
    return _CACHE[name]


def pixels_for(family: Family, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    p = PATCH[family.name]
    grids = np.array([GRIDS[n] for n in names], np.int64)
    pieces = [
        np.random.default_rng(ord(n)).normal(size=(int(np.prod(GRIDS[n])), 6 * p * p))
        for n in names
    ]
    return np.concatenate(pieces).astype(np.float32), grids


def build_row(rng: np.random.Generator, parts: list[int | str]) -> list[int]:
    row: list[int] = []
    for part in parts:
        if isinstance(part, str):
            n = int(np.prod(GRIDS[part])) // 4
            row += [VISION_START_TOKEN_ID] + [IMAGE_TOKEN_ID] * n + [VISION_END_TOKEN_ID]
        else:
            row += rng.integers(0, 240, part).tolist()
    return row


def hf_logits(model: Any, ids: np.ndarray, mask: np.ndarray, pixels: Any, grids: Any) -> Any:
    kwargs: dict[str, Any] = {
        "input_ids": torch.as_tensor(ids),
        "attention_mask": torch.as_tensor(mask),
        "mm_token_type_ids": torch.as_tensor((ids == IMAGE_TOKEN_ID).astype(np.int64)),
    }
    if pixels is not None:
        kwargs["pixel_values"] = torch.as_tensor(pixels)
        kwargs["image_grid_thw"] = torch.as_tensor(grids)
    with torch.no_grad():
        return model(**kwargs).logits.float().numpy()


def check(family: Family, tol: dict, ids: Any, mask: Any, pixels: Any, grids: Any) -> None:
    ours = np.asarray(forward(family.params, family.config, ids, mask, pixels, grids))
    ref = hf_logits(family.hf_model, ids, mask, pixels, grids)
    real = mask == 1
    np.testing.assert_allclose(ours[real], ref[real], atol=tol["float32"], rtol=0)
    assert np.abs(ref[real]).max() > 1.0, "logits this small could hide errors"


def test_config_family_comes_from_config_json(family):
    assert family.config.model_type == family.name
    qwen3 = family.name == "qwen3_vl"
    assert family.config.text.qk_norm == qwen3 and family.config.text.mrope_interleaved == qwen3
    assert family.config.vision.norm == "layer" and family.config.vision.window_size == 0
    assert (family.params.vision.deepstack is not None) == qwen3


def test_text_only_rows(family, tol):
    rng = np.random.default_rng(0)
    ids, mask = pad_rows([build_row(rng, [7]), build_row(rng, [4])], "left")
    check(family, tol, ids, mask, None, None)


def test_one_image(family, tol):
    ids, mask = pad_rows([build_row(np.random.default_rng(1), [5, "A", 4])], "right")
    check(family, tol, ids, mask, *pixels_for(family, ["A"]))


def test_two_images_of_different_sizes_in_one_row(family, tol):
    ids, mask = pad_rows([build_row(np.random.default_rng(3), [3, "A", 2, "B", 6])], "right")
    check(family, tol, ids, mask, *pixels_for(family, ["A", "B"]))


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_mixing_rows_with_and_without_images(family, tol, side):
    ids, mask = pad_rows_mixed(side)
    assert (mask == 0).any(axis=1).sum() == 2, "two rows must be padded"
    check(family, tol, ids, mask, *pixels_for(family, ["A", "C", "B"]))


def pad_rows_mixed(side: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    rows = [build_row(rng, [9]), build_row(rng, [4, "A", 1, "C", 2]), build_row(rng, [2, "B", 3])]
    return pad_rows(rows, side)


def test_rope_index_matches_hf(family):
    ids, mask = pad_rows_mixed("left")
    _, grids = pixels_for(family, ["A", "C", "B"])
    assert_rope_index_matches_hf(family.hf_model, family.config, ids, mask, grids)


def test_vision_tower_and_deepstack_features_match_hf(family, tol):
    pixels, grids = pixels_for(family, ["B", "C"])
    _, merged, deepstack = vision.run_vision_tower(
        family.params.vision, family.config.vision, pixels, grids
    )
    with torch.no_grad():
        out = family.hf_model.model.visual(torch.as_tensor(pixels), grid_thw=torch.as_tensor(grids))
    np.testing.assert_allclose(merged, out.pooler_output.numpy(), atol=tol["float32"], rtol=0)
    ref_stack = getattr(out, "deepstack_features", None)
    if family.name != "qwen3_vl":
        assert deepstack is None
        return
    assert deepstack is not None and len(ref_stack) == deepstack.shape[0] == 2
    for ours, ref in zip(deepstack, ref_stack, strict=True):
        np.testing.assert_allclose(ours, ref.numpy(), atol=tol["float32"], rtol=0)


def _replace(config: Any, part: str, **changes: Any) -> Any:
    return dataclasses.replace(
        config, **{part: dataclasses.replace(getattr(config, part), **changes)}
    )


WRONG = {
    "qwen2_vl": [("text", {"mrope_section": (3, 3, 2)}), ("text", {"mrope_interleaved": True})],
    "qwen3_vl": [
        ("text", {"mrope_interleaved": False}),
        ("text", {"mrope_section": (6, 0, 6)}),  # no h frequencies (1, 4, 7, 10 go to t)
        ("vision", {"deepstack_visual_indexes": (1, 2)}),
        ("vision", {"deepstack_visual_indexes": (2, 0)}),
    ],
}


def test_wrong_settings_fail(family, tol):
    """The comparison can fail: each wrong setting moves logits far past the tolerance."""
    ids, mask = pad_rows([build_row(np.random.default_rng(3), [3, "A", 2, "B", 6])], "right")
    pixels, grids = pixels_for(family, ["A", "B"])
    ref = hf_logits(family.hf_model, ids, mask, pixels, grids)
    for part, change in WRONG[family.name]:
        wrong = _replace(family.config, part, **change)
        ours = np.asarray(forward(family.params, wrong, ids, mask, pixels, grids))
        assert np.abs(ours - ref).max() > 100 * tol["float32"], change


def test_position_table_resampling_is_align_corners(family):
    """The taps equal HF's bilinear, align_corners=True resampling (and not half-pixel)."""
    if family.name != "qwen3_vl":
        pytest.skip("only Qwen3-VL has a learned position table")
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    grids = np.array([GRIDS["B"], (2, 4, 6)])
    layout = vision.vision_layout(grids, family.config.vision)
    for corners in (True, False):
        index, weight = get_vision_interpolation_indices_and_weights(
            torch.as_tensor(grids), 6, align_corners=corners, spatial_merge_size=2
        )
        same = np.array_equal(layout.pos_index, index.numpy()) and np.allclose(
            layout.pos_weight, weight.numpy(), atol=1e-7
        )
        assert same == corners


def test_round_trip_is_bit_exact_and_loads_in_hf(family, tmp_path):
    out = jax_to_hf(family.model_dir, tmp_path / "exported", progress=False)
    original, exported = open_checkpoint(family.hf_dir), open_checkpoint(out)
    assert set(exported) == set(original)
    for key in original:
        np.testing.assert_array_equal(exported[key].get(key), original[key].get(key), key)
    written = Qwen2_5_VLConfig.from_hf_dict(family.config.to_hf_dict())
    assert written == family.config
    reloaded = type(family.hf_model).from_pretrained(out).float().eval()
    ids, mask = pad_rows([build_row(np.random.default_rng(1), [5, "A", 4])], "right")
    pixels, grids = pixels_for(family, ["A"])
    np.testing.assert_array_equal(
        hf_logits(reloaded, ids, mask, pixels, grids),
        hf_logits(family.hf_model, ids, mask, pixels, grids),
    )


def test_moe_checkpoints_are_refused_by_name(tmp_path):
    raw = json.loads(family_hf_config("qwen3_vl").to_json_string())
    raw["model_type"] = "qwen3_vl_moe"
    with pytest.raises(ConfigError, match=r"qwen3_vl_moe.*MoE"):
        Qwen2_5_VLConfig.from_hf_dict(raw)


# ---------------------------------------------------------------- sampling and sharding

NEW, STOP = 8, 7


def test_greedy_sampling_equals_hf_generate(family):
    """A padded batch: text only, one image, two images; each row against HF alone."""
    rng = np.random.default_rng(5)
    parts = [([6], []), ([2, "A", 5], ["A"]), ([3, "B", 1, "C", 2], ["B", "C"])]
    rows = [(build_row(rng, p), names) for p, names in parts]
    ids, mask = pad_rows([r for r, _ in rows], "right")
    pixels, grids = pixels_for(family, [n for _, names in rows for n in names])
    sampler = Sampler(family.config, stop_token_ids=[STOP], length_buckets=(64, 128))
    gen = sampler.generate_ids(
        family.params, ids, mask, SamplingParams(max_new_tokens=NEW, temperature=0),
        jax.random.key(0), pixel_values=pixels, image_grid_thw=grids, decode_text=False,
    )  # fmt: skip
    for b, (r, names) in enumerate(rows):
        own = pixels_for(family, names) if names else (None, None)
        expected = hf_greedy(family.hf_model, r, *own, new=NEW, stop=STOP, image_id=IMAGE_TOKEN_ID)
        assert gen.samples[b][0].tokens.tolist() == expected, f"row {b}"


def test_sharded_forward_matches_single_device(family, tol, tmp_path):
    """Params over fsdp=2 x tensor=4 of 8 simulated devices: the same logits with images."""
    if family.name != "qwen3_vl":
        pytest.skip("one family is enough: the sharding rules do not depend on it")
    ids, mask = pad_rows_mixed("left")
    pixels, grids = pixels_for(family, ["A", "C", "B"])
    logits = np.asarray(forward(family.params, family.config, ids, mask, pixels, grids))
    diff, sharded = sharded_forward(
        family.model_dir, tmp_path, 2, 4, ids=ids, mask=mask, logits=logits, pixels=pixels,
        grids=grids,
    )  # fmt: skip
    assert diff <= tol["float32"] and sharded > 0
