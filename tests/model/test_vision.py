"""The vision tower without HF: layout invariants, images kept apart, no recompiles, errors.

HF parity lives in tests/parity/test_vision_parity.py; these tests use random JAX weights.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from vlmgym_model import forward
from vlmgym_model.qwen2_5_vl import vision
from vlmgym_model.qwen2_5_vl.config import Qwen2_5_VLConfig, TextConfig, VisionConfig
from vlmgym_model.qwen2_5_vl.model import param_specs
from vlmgym_model.weights import ParamSpec, is_spec

VISION = VisionConfig(
    depth=2,
    hidden_size=32,
    intermediate_size=48,
    num_heads=2,
    out_hidden_size=32,
    window_size=56,  # windows of 2x2 merge units = 16 patches
    fullatt_block_indexes=(1,),
)
TEXT = TextConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    mrope_section=(2, 3, 3),
)
CONFIG = Qwen2_5_VLConfig(
    text=TEXT,
    vision=VISION,
    image_token_id=60,
    video_token_id=61,
    vision_start_token_id=62,
    vision_end_token_id=63,
    bos_token_id=None,
    eos_token_id=None,
)


@pytest.fixture(scope="module")
def params():
    """Random weights drawn in numpy (no per-shape compiles), with perturbed norms and biases."""
    rng = np.random.default_rng(0)

    def draw(spec: ParamSpec) -> jax.Array:
        noise = rng.normal(size=spec.shape)
        value = {"ones": 1.0 + 0.3 * noise, "zeros": 0.2 * noise}.get(spec.init, 0.2 * noise)
        return jnp.asarray(value, jnp.float32)

    return jax.tree.map(draw, param_specs(CONFIG), is_leaf=is_spec)


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def random_pixels(grids: list[tuple[int, int, int]], seed: int = 0) -> np.ndarray:
    P = sum(t * h * w for t, h, w in grids)
    return np.random.default_rng(seed).normal(size=(P, VISION.patch_dim)).astype(np.float32)


@pytest.mark.parametrize(
    "grids",
    [[(1, 8, 8)], [(1, 6, 10), (1, 4, 14), (1, 2, 2)], [(2, 6, 4), (1, 10, 2)]],
)
def test_layout_invariants(grids):
    layout = vision.vision_layout(np.array(grids), VISION)
    P, mu = layout.num_patches, VISION.merge_unit
    assert layout.patch_order.shape == (sum(t * h * w for t, h, w in grids),)
    np.testing.assert_array_equal(np.sort(layout.patch_order), np.arange(P))
    # Units move whole: each unit's four patches stay together and in order.
    units = layout.patch_order.reshape(-1, mu)
    np.testing.assert_array_equal(units, units[:, :1] + np.arange(mu))
    np.testing.assert_array_equal(units[layout.unit_inverse, 0] // mu, np.arange(P // mu))
    for seg in (layout.window_segments, layout.image_segments):
        assert seg.min() == 1 and (np.diff(seg) >= 0).all(), "segments are contiguous runs"
        assert (np.diff(seg) <= 1).all(), "segment ids are numbered without gaps"
    assert np.bincount(layout.window_segments).max() <= layout.max_window_len
    assert np.bincount(layout.image_segments).max() <= layout.max_image_len <= P
    # A window never spans two image frames.
    for w in np.unique(layout.window_segments):
        assert len(np.unique(layout.image_segments[layout.window_segments == w])) == 1


def test_images_do_not_interact(params, tol):
    """Two images encoded together give the features of each encoded alone."""
    a, b = (1, 8, 8), (1, 4, 16)  # equal P: one compile serves both single-image calls
    pa, pb = random_pixels([a], 1), random_pixels([b], 2)
    both = vision.encode_images(params.vision, VISION, np.concatenate([pa, pb]), [a, b])
    alone = [vision.encode_images(params.vision, VISION, p, [g]) for p, g in ((pa, a), (pb, b))]
    assert both.shape == (32, VISION.out_hidden_size) and both.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(both), np.concatenate([np.asarray(x) for x in alone]), atol=tol["float32"]
    )


def test_block_sparse_bounds_match_dense_reference(params, tol):
    """The static segment bounds are tight enough for the xla path and never too small.

    Six 8x8 images: the window (16 patches) and full (64) bounds both tile P = 384 into
    more than three blocks, so the block-sparse xla path runs in both kinds of layer.
    """
    grids = [(1, 8, 8)] * 6
    pixels = random_pixels(grids, 3)
    layout = vision.vision_layout(np.array(grids), VISION)
    assert (layout.max_window_len, layout.max_image_len) == (16, 64)
    xla = vision.encode_images(params.vision, VISION, pixels, grids, impl="xla")
    ref = vision.encode_images(params.vision, VISION, pixels, grids, impl="reference")
    np.testing.assert_allclose(np.asarray(xla), np.asarray(ref), atol=tol["float32"])
    assert np.abs(np.asarray(ref)).max() > 0.1


def test_same_patch_count_does_not_recompile(params):
    """Grids with equal P and equal segment bounds share one compiled tower."""
    vision.encode_images(params.vision, VISION, random_pixels([(1, 8, 8)]), [(1, 8, 8)])
    compiled = vision.vision_tower._cache_size()
    for grids in ([(1, 4, 16)], [(1, 16, 4)], [(1, 6, 8), (1, 2, 8)], [(1, 2, 32)]):
        vision.encode_images(params.vision, VISION, random_pixels(grids), grids)
    assert vision.vision_tower._cache_size() == compiled
    other = dataclasses.replace(VISION, rope_theta=10_001.0)  # the count can move
    vision.encode_images(params.vision, other, random_pixels([(1, 8, 8)]), [(1, 8, 8)])
    assert vision.vision_tower._cache_size() == compiled + 1


def test_vision_tower_is_differentiable(params):
    """Gradients flow through window and full blocks (the tower can be trained)."""
    grids = [(1, 4, 8)]
    layout = vision.vision_layout(np.array(grids), VISION)
    pixels = jnp.asarray(random_pixels(grids, 4))

    def loss(weights: vision.VisionWeights) -> jax.Array:
        _, features, _ = vision.vision_tower(
            weights,
            pixels,
            jnp.asarray(layout.patch_order),
            jnp.asarray(layout.unit_inverse),
            jnp.asarray(layout.positions),
            jnp.asarray(layout.window_segments),
            jnp.asarray(layout.image_segments),
            cfg=VISION,
            impl="xla",
            max_window_len=layout.max_window_len,
            max_image_len=layout.max_image_len,
            remat=True,
        )
        return jnp.sum(features**2)

    grads = jax.grad(loss)(params.vision)
    for name in ("patch_embed", "merger_fc1"):
        g = np.asarray(getattr(grads, name))
        assert np.isfinite(g).all() and np.abs(g).max() > 0, name
    qkv = np.asarray(grads.blocks.qkv_proj)
    assert (np.abs(qkv).reshape(VISION.depth, -1).max(axis=1) > 0).all()


def test_placeholder_mismatch_names_both_counts(params):
    """15 placeholders for an 8x8-patch image (16 merged tokens): a clear error."""
    ids = np.array([[1, 62] + [60] * 15 + [63, 2]])
    grids = np.array([[1, 8, 8]])
    with pytest.raises(ValueError, match=r"15 image placeholder tokens.*16 merged image"):
        forward(params, CONFIG, ids, None, random_pixels([(1, 8, 8)]), grids)


def test_bad_inputs_raise(params):
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        vision.vision_layout(np.array([[1, 7, 8]]), VISION)
    with pytest.raises(ValueError, match=r"expected \(64, 1176\)"):
        vision.encode_images(params.vision, VISION, random_pixels([(1, 4, 8)]), [(1, 8, 8)])


def test_vision_rope_theta_reads_and_round_trips():
    raw = CONFIG.to_hf_dict()
    assert "rope_parameters" not in raw["vision_config"], "the default theta is not written"
    raw["vision_config"]["rope_parameters"] = {"rope_type": "axial", "rope_theta": 5000.0}
    cfg = Qwen2_5_VLConfig.from_hf_dict(raw)
    assert cfg.vision.rope_theta == 5000.0
    assert Qwen2_5_VLConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
