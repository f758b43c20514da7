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

from vlmgym_model.qwen2_5_vl import text
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


@functools.partial(jax.jit, static_argnames=("config", "impl"))
def _text_forward(
    params: Qwen2_5_VLWeights,
    input_ids: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array,
    *,
    config: Qwen2_5_VLConfig,
    impl: str,
) -> jax.Array:
    x = text.embed_tokens(params.text, input_ids)  # [B, T, D]
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
    """Logits of a (possibly padded) batch.

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
    if pixel_values is not None or image_grid_thw is not None:
        raise NotImplementedError(
            "forward() does not take images yet: the vision tower's forward pass is not "
            "implemented; pass text-only inputs"
        )
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(
            f"attention_mask has shape {mask.shape} but input_ids has shape {ids.shape}"
        )
    if (ids == config.image_token_id).any():
        raise ValueError(
            f"input_ids hold {int((ids == config.image_token_id).sum())} image placeholder "
            "tokens but no pixel_values were given"
        )
    if position_ids is None:
        positions, _ = get_rope_index(ids, mask, None, config)
    else:
        positions = np.asarray(position_ids)
        if positions.shape != (3, *ids.shape):
            raise ValueError(
                f"position_ids must be [3, B, T] = {(3, *ids.shape)}, got {positions.shape}"
            )
    return _text_forward(
        params,
        jnp.asarray(ids, jnp.int32),
        jnp.asarray(mask != 0, jnp.int32),
        jnp.asarray(positions),
        config=config,
        impl=impl,
    )
