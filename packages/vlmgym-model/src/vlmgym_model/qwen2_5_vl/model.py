"""Qwen2.5-VL: the whole model's weights and its forward pass.

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


def embed_inputs(
    weights: TextWeights,
    input_ids: jax.Array,
    image_features: jax.Array | None = None,
    image_index: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Token embeddings with image features written over the placeholder tokens.

    Args:
      input_ids: int[B, T].
      image_features: [M, D], the vision tower's merged outputs, in placeholder order.
      image_index: (rows int[M], columns int[M]) of the placeholders, row-major, as
        `np.nonzero(input_ids == image_token_id)` gives them.

    Returns:
      [B, T, D] in the embedding's dtype.
    """
    x = text.embed_tokens(weights, input_ids)  # [B, T, D]
    if image_features is None:
        return x
    if image_index is None:
        raise ValueError("image_features need image_index (where the placeholders are)")
    rows, cols = image_index
    return x.at[rows, cols].set(image_features.astype(x.dtype))


@functools.partial(jax.jit, static_argnames=("config", "impl"))
def forward_tokens(
    params: Qwen2_5_VLWeights,
    input_ids: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array,
    image_features: jax.Array | None = None,
    image_index: tuple[jax.Array, jax.Array] | None = None,
    *,
    config: Qwen2_5_VLConfig,
    impl: str = "xla",
) -> jax.Array:
    """The jitted core of `forward`, with everything explicit (no host-side derivation).

    Args:
      input_ids: int[B, T]; segment_ids: int[B, T] (0 on padding); positions: int[3, B, T].
      image_features: [M, D] merged vision features and image_index (rows, cols) int[M]
        each: where they go. Tokens are never re-read as image placeholders here, so a
        completion that happens to contain the placeholder id is safe to score.

    Returns:
      float32[B, T, V] logits.
    """
    x = embed_inputs(params.text, input_ids, image_features, image_index)  # [B, T, D]
    cos, sin = mrope_cos_sin(positions, config.text)  # [B, T, H]
    hidden, _ = text.decode_layers(params.text, x, cos, sin, segment_ids, config.text, impl=impl)
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
        positions, _ = get_rope_index(ids, mask, grids, config)
    else:
        positions = np.asarray(position_ids)
        if positions.shape != (3, *ids.shape):
            raise ValueError(
                f"position_ids must be [3, B, T] = {(3, *ids.shape)}, got {positions.shape}"
            )
    features, index = None, None
    if n_image_tokens:
        features = vision.encode_images(
            params.vision, config.vision, pixel_values, grids, impl=impl
        )  # [M, D]
        rows, cols = np.nonzero(ids == config.image_token_id)
        index = (jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32))
    return forward_tokens(
        params,
        jnp.asarray(ids, jnp.int32),
        jnp.asarray(mask != 0, jnp.int32),
        jnp.asarray(positions),
        features,
        index,
        config=config,
        impl=impl,
    )
