"""A Qwen-VL model (any family in `config.FAMILIES`): its weights and its forward pass.

`forward` takes inputs exactly as the processor returns them (numpy or jax arrays):
token ids, attention mask (1 = token, 0 = padding, left or right), and optionally
`pixel_values` / `image_grid_thw`. Position ids (mRoPE) are derived on the host from the
token ids; the heavy part runs in one jitted function per input shape.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlmgym_model.qwen2_5_vl import text, vision
from vlmgym_model.qwen2_5_vl.config import Qwen2_5_VLConfig
from vlmgym_model.qwen2_5_vl.rope import get_rope_index, mrope_cos_sin
from vlmgym_model.qwen2_5_vl.text import TextWeights, text_param_specs
from vlmgym_model.qwen2_5_vl.vision import VisionWeights, vision_param_specs
from vlmgym_model.weights import init_params


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Qwen2_5_VLWeights:
    text: TextWeights
    vision: VisionWeights


def param_specs(config: Qwen2_5_VLConfig) -> Qwen2_5_VLWeights:
    """Every weight's shape, logical axes and initialiser, as a pytree of ParamSpec."""
    return Qwen2_5_VLWeights(
        text=text_param_specs(config.text), vision=vision_param_specs(config.vision)
    )


def init_random_params(
    config: Qwen2_5_VLConfig, key: jax.Array, dtype: Any = jnp.float32, scale: float = 0.02
) -> Qwen2_5_VLWeights:
    """Random weights (normal(0, scale) matrices, unit norms, zero biases)."""
    return init_params(param_specs(config), key, dtype, scale)


def check_image_placeholders(
    config: Qwen2_5_VLConfig, input_ids: np.ndarray, image_grid_thw: np.ndarray | None
) -> int:
    """Check that the image placeholder tokens match the images; return their count.

    Each image of grid (t, h, w) patches becomes t * h * w / merge**2 tokens, which must
    stand in input_ids as that many `image_token_id` placeholders.
    """
    n_tokens = int((input_ids == config.image_token_id).sum())
    merge = config.vision.merge_unit
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw)
    if grids.ndim != 2 or grids.shape[1] != 3:
        raise ValueError(f"image_grid_thw must be [n_images, 3], got shape {grids.shape}")
    n_features = int(grids.prod(axis=1).sum()) // merge
    if n_tokens != n_features:
        raise ValueError(
            f"input_ids hold {n_tokens} image placeholder tokens (id {config.image_token_id}) "
            f"but the {len(grids)} image(s) in image_grid_thw give {n_features} merged image "
            "features. The prompt and the images disagree: build input_ids and pixel_values "
            "with the same Processor call (each <|image_pad|> expands to its image's "
            "merged-token count), and do not truncate prompts that hold images."
        )
    return n_tokens


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ImageInputs:
    """A batch's images and where their merged features go (a pytree; see `image_inputs`).

    The index arrays are `VisionLayout`'s; its two segment bounds are static fields, so a
    jitted function taking `ModelInputs` compiles once per bound, not once per value.
    """

    pixel_values: jax.Array  # float32[P, C * T * p * p], HF's patch order
    patch_order: jax.Array  # int32[P]
    unit_inverse: jax.Array  # int32[P // merge_unit]
    patch_positions: jax.Array  # int32[P, 2]
    window_segments: jax.Array  # int32[P]
    image_segments: jax.Array  # int32[P]
    rows: jax.Array  # int32[K]: (row, column) of each placeholder token that gets a feature
    cols: jax.Array  # int32[K]
    feature_index: jax.Array  # int32[K]: which merged feature goes there
    max_window_len: int = dataclasses.field(metadata={"static": True})
    max_image_len: int = dataclasses.field(metadata={"static": True})
    pos_index: jax.Array | None = None  # int32[P, 4]: learned position taps (Qwen3-VL)
    pos_weight: jax.Array | None = None  # float32[P, 4]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelInputs:
    """Everything the model reads for a batch of sequences: the one input of `embed`.

    Built on the host by `model_inputs` (numpy leaves are fine: jit converts them).
    """

    ids: jax.Array  # int32[B, T]
    segment_ids: jax.Array  # int32[B, T]: 1 on tokens, 0 on padding
    positions: jax.Array  # int32[3, B, T]: mRoPE positions
    images: ImageInputs | None = None


def image_inputs(
    config: Qwen2_5_VLConfig,
    pixel_values: Any,
    image_grid_thw: Any,
    rows: np.ndarray,
    cols: np.ndarray,
    feature_index: np.ndarray | None = None,
    *,
    bucket: bool = False,
    drop_row: int | None = None,
) -> ImageInputs:
    """`ImageInputs` for images whose placeholders sit at (rows, cols) (host side).

    feature_index: which merged feature each placeholder receives (default: the k-th
    placeholder in row-major order gets the k-th feature, as the processor lays them out).
    bucket: pad the patches to a power of two with one blank image whose features go
      nowhere (attention stays within each image, so the real features do not change): a
      run whose image count or sizes vary (multi-turn tool results) compiles once per
      bucket, not once per step.
    drop_row: pad the placements to one per feature with entries at this row, out of
      the batch's range, which the scatter drops (constant shapes for a sampler's prefill).
    """
    pixels = np.asarray(pixel_values, np.float32)
    grids = np.asarray(image_grid_thw).reshape(-1, 3)
    merge = config.vision.spatial_merge_size
    if bucket:
        grids, pixels = _blank_images(grids, pixels, merge)
    if drop_row is not None:
        features = int(grids.prod(axis=1).sum()) // (merge * merge)
        extra = features - len(rows)
        if feature_index is None:
            feature_index = np.arange(len(rows), dtype=np.int32)
        rows = np.concatenate([rows, np.full(extra, drop_row)])
        cols = np.concatenate([cols, np.zeros(extra, np.int64)])
        feature_index = np.concatenate([feature_index, np.zeros(extra, np.int64)])
    layout = vision.vision_layout(grids, config.vision)
    expected = (layout.num_patches, config.vision.patch_dim)
    if pixels.shape != expected:
        raise ValueError(
            f"pixel_values has shape {pixels.shape}, but image_grid_thw describes "
            f"{layout.num_patches} patches of {config.vision.patch_dim} values: "
            f"expected {expected}"
        )
    if feature_index is None:
        feature_index = np.arange(len(rows), dtype=np.int32)
    return ImageInputs(
        pixel_values=pixels,
        patch_order=layout.patch_order,
        unit_inverse=layout.unit_inverse,
        patch_positions=layout.positions,
        window_segments=layout.window_segments,
        image_segments=layout.image_segments,
        rows=np.asarray(rows, np.int32),
        cols=np.asarray(cols, np.int32),
        feature_index=np.asarray(feature_index, np.int32),
        max_window_len=layout.max_window_len,
        max_image_len=layout.max_image_len,
        pos_index=layout.pos_index,
        pos_weight=layout.pos_weight,
    )


def _blank_images(grids: np.ndarray, pixels: np.ndarray, merge: int) -> tuple[np.ndarray, Any]:
    """Blank images after the real ones, up to a power of two of patches. Each is at
    most the size of the largest real image rounded up to a power of two, so the vision
    tower's static per-image bound does not grow with them."""
    patches = int(grids.prod(axis=1).sum())
    missing = max(merge * merge, 1 << max(0, patches - 1).bit_length()) - patches
    chunk = 1 << max(0, int(grids.prod(axis=1).max()) - 1).bit_length()
    blanks = []
    while missing > 0:  # patch counts are multiples of merge^2, so each piece is too
        size = min(chunk, missing)
        blanks.append([1, merge, size // merge])
        missing -= size
    if not blanks:
        return grids, pixels
    added = int(sum(b[2] for b in blanks)) * merge
    return (
        np.concatenate([grids, blanks]).astype(grids.dtype),
        np.concatenate([pixels, np.zeros((added, pixels.shape[1]), np.float32)]),
    )


def model_inputs(
    config: Qwen2_5_VLConfig,
    input_ids: Any,
    attention_mask: Any = None,
    pixel_values: Any = None,
    image_grid_thw: Any = None,
    *,
    position_ids: Any = None,
) -> tuple[ModelInputs, np.ndarray]:
    """Host-side `ModelInputs` from processor outputs, and each row's mRoPE delta.

    Checks that the image placeholders match the images, derives mRoPE positions (HF's
    `get_rope_index`) unless `position_ids` are given, and lays the images out for the
    vision tower. Returns (inputs, int[B] rope deltas: next position - sequence length).
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(
            f"attention_mask has shape {mask.shape} but input_ids has shape {ids.shape}"
        )
    if (pixel_values is None) != (image_grid_thw is None):
        raise ValueError("pixel_values and image_grid_thw must be given together")
    grids = None if image_grid_thw is None else np.asarray(image_grid_thw)
    n_image_tokens = check_image_placeholders(config, ids, grids)
    if position_ids is None:
        positions, deltas = get_rope_index(ids, mask, grids, config)
    else:
        positions = np.asarray(position_ids)
        if positions.shape != (3, *ids.shape):
            raise ValueError(
                f"position_ids must be [3, B, T] = {(3, *ids.shape)}, got {positions.shape}"
            )
        deltas = positions.max(axis=(0, 2)) + 1 - (mask != 0).sum(axis=1)
    images = None
    if n_image_tokens:
        rows, cols = np.nonzero(ids == config.image_token_id)
        images = image_inputs(
            config, pixel_values, grids, rows, cols, bucket=True, drop_row=ids.shape[0]
        )
    inputs = ModelInputs(
        ids=ids.astype(np.int32),
        segment_ids=(mask != 0).astype(np.int32),
        positions=np.asarray(positions, np.int32),
        images=images,
    )
    return inputs, np.asarray(deltas)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ImageFeatures:
    """The vision tower's output for a batch's images: what `place_features` writes."""

    merged: jax.Array  # [M, D]: one feature per merged 2x2 patch unit, images concatenated
    deepstack: jax.Array | None = None  # [k, M, D]: Qwen3-VL's DeepStack features


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class FeaturePlacement:
    """Where features go: (rows[k], cols[k]) receives feature feature_index[k].

    Entries whose row is out of range (>= the batch's rows) are dropped: padding, so that
    every micro-batch of a step has the same number of entries.
    """

    rows: jax.Array  # int32[K]
    cols: jax.Array  # int32[K]
    feature_index: jax.Array  # int32[K]

    @classmethod
    def of(cls, images: ImageInputs) -> FeaturePlacement:
        return cls(images.rows, images.cols, images.feature_index)


def image_features(
    vision_params: VisionWeights,
    config: Qwen2_5_VLConfig,
    images: ImageInputs,
    *,
    impl: str = "xla",
    remat: bool = False,
) -> ImageFeatures:
    """The vision tower on every image of `images`."""
    _, merged, deepstack = vision.vision_tower(
        vision_params,
        images.pixel_values,
        images.patch_order,
        images.unit_inverse,
        images.patch_positions,
        images.window_segments,
        images.image_segments,
        images.pos_index,
        images.pos_weight,
        cfg=config.vision,
        impl=impl,
        max_window_len=images.max_window_len,
        max_image_len=images.max_image_len,
        remat=remat,
    )  # [M, D]
    return ImageFeatures(merged, deepstack)


def place_features(
    x: jax.Array, features: ImageFeatures, placement: FeaturePlacement
) -> tuple[jax.Array, text.Deepstack | None]:
    """Token embeddings x [B, T, D] with image features over their placeholders, and the
    `Deepstack` for the decoder (None without DeepStack)."""
    picked = features.merged[placement.feature_index]  # [K, D]
    x = x.at[placement.rows, placement.cols].set(picked.astype(x.dtype), mode="drop")
    if features.deepstack is None:
        return x, None
    deep = features.deepstack[:, placement.feature_index]  # [k, K, D]
    return x, text.Deepstack(placement.rows, placement.cols, deep)


def embed(
    params: Qwen2_5_VLWeights,
    config: Qwen2_5_VLConfig,
    inputs: ModelInputs,
    *,
    impl: str = "xla",
    remat: bool = False,
    train_vision: bool = True,
    features: ImageFeatures | None = None,
    placement: FeaturePlacement | None = None,
) -> tuple[jax.Array, text.Deepstack | None]:
    """The decoder's input: token embeddings with the images' features over their
    placeholders, and (Qwen3-VL) the DeepStack features for the first decoder layers.
    Sampling's prefill, `forward` and training's log-prob pass all start here.

    Tokens are never re-read as image placeholders (`ImageInputs` says where features
    go), so a completion that happens to contain the placeholder id is safe to score.
    `train_vision=False` stops gradients at the vision tower's weights. `features` and
    `placement` given: the vision tower has already run (training's micro-batches run
    it once per step) and `inputs.images` is ignored.

    Returns:
      [B, T, D] in the embedding's dtype, and the `Deepstack` for `text.decode_layers`
      (None without images or without DeepStack).
    """
    x = text.embed_tokens(params.text, inputs.ids)  # [B, T, D]
    if features is not None:
        assert placement is not None, "features need their placement"
        return place_features(x, features, placement)
    img = inputs.images
    if img is None:
        return x, None
    vision_params = params.vision if train_vision else jax.lax.stop_gradient(params.vision)
    features = image_features(vision_params, config, img, impl=impl, remat=remat)
    return place_features(x, features, FeaturePlacement.of(img))


@functools.partial(jax.jit, static_argnames=("config", "impl"))
def forward_tokens(
    params: Qwen2_5_VLWeights,
    inputs: ModelInputs,
    *,
    config: Qwen2_5_VLConfig,
    impl: str = "xla",
) -> jax.Array:
    """The jitted core of `forward`: float32[B, T, V] logits of `ModelInputs`."""
    x, deepstack = embed(params, config, inputs, impl=impl)  # [B, T, D]
    cos, sin = mrope_cos_sin(inputs.positions, config.text)  # [B, T, H]
    hidden, _ = text.decode_layers(
        params.text, x, cos, sin, inputs.segment_ids, config.text, impl=impl, deepstack=deepstack
    )
    return text.logits_from_hidden(params.text, hidden)  # [B, T, V]


def forward(
    params: Qwen2_5_VLWeights,
    config: Qwen2_5_VLConfig,
    input_ids: Any,
    attention_mask: Any = None,
    pixel_values: Any = None,
    image_grid_thw: Any = None,
    *,
    position_ids: Any = None,
    impl: str = "xla",
) -> jax.Array:
    """Logits of a (possibly padded) batch, with or without images.

    Args:
      params: the model's weights.
      config: its architecture.
      input_ids: int[B, T] token ids, as the processor returns them.
      attention_mask: int[B, T], 1 on tokens and 0 on padding (either side); None means
        no padding.
      pixel_values: float32[P, 1176] patches of every image in the batch, or None.
      image_grid_thw: int[n_images, 3] patch grid of each image, or None.
      position_ids: int[3, B, T] mRoPE positions to use instead of those derived from
        input_ids (HF's `get_rope_index`), e.g. positions kept from a rollout.
      impl: attention implementation (see `vlmgym_kernels`).

    Returns:
      float32[B, T, V] logits. Logits at padding positions are not meaningful.
    """
    inputs, _ = model_inputs(
        config,
        input_ids,
        attention_mask,
        pixel_values,
        image_grid_thw,
        position_ids=position_ids,
    )
    return forward_tokens(params, inputs, config=config, impl=impl)
