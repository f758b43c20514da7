"""The Qwen2.5-VL vision tower: weights.

The tower is a ViT over 14x14 patches of two identical frames (a Conv3d with kernel =
stride = (2, 14, 14), i.e. a matmul over 1176 inputs), with 2D rotary embeddings, window
attention (full attention in the blocks of `fullatt_block_indexes`), RMSNorm, a SwiGLU MLP
with biases, and a merger (RMSNorm, 2x2 neighbours concatenated, Linear, GELU, Linear) into
the text width.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from vlmgym_model.qwen2_5_vl.config import VisionConfig
from vlmgym_model.weights import ParamSpec


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class VisionBlocks:
    """All vision blocks, stacked on a leading L axis (E: vision width, Fv: its MLP width)."""

    norm1: jax.Array  # [L, E]
    qkv_proj: jax.Array  # [L, E, 3, N, H]
    qkv_bias: jax.Array  # [L, 3, N, H]
    o_proj: jax.Array  # [L, N, H, E]
    o_bias: jax.Array  # [L, E]
    norm2: jax.Array  # [L, E]
    gate_proj: jax.Array  # [L, E, F]
    gate_bias: jax.Array  # [L, F]
    up_proj: jax.Array  # [L, E, F]
    up_bias: jax.Array  # [L, F]
    down_proj: jax.Array  # [L, F, E]
    down_bias: jax.Array  # [L, E]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class VisionWeights:
    patch_embed: jax.Array  # [C * T * p * p, E]
    blocks: VisionBlocks
    merger_norm: jax.Array  # [E]
    merger_fc1: jax.Array  # [4E, 4E]
    merger_fc1_bias: jax.Array  # [4E]
    merger_fc2: jax.Array  # [4E, D]
    merger_fc2_bias: jax.Array  # [D]


def vision_param_specs(cfg: VisionConfig) -> VisionWeights:
    """The shape, logical axes and initialiser of every vision weight."""
    L, E, F = cfg.depth, cfg.hidden_size, cfg.intermediate_size
    N, H = cfg.num_heads, cfg.head_dim
    M = E * cfg.merge_unit
    blocks = VisionBlocks(
        norm1=ParamSpec((L, E), ("layers", "norm"), "ones"),
        qkv_proj=ParamSpec(
            (L, E, 3, N, H), ("layers", "vision_embed", "vision_qkv", "vision_heads", "head_dim")
        ),
        qkv_bias=ParamSpec(
            (L, 3, N, H), ("layers", "vision_qkv", "vision_heads", "head_dim"), "zeros"
        ),
        o_proj=ParamSpec((L, N, H, E), ("layers", "vision_heads", "head_dim", "vision_embed")),
        o_bias=ParamSpec((L, E), ("layers", "norm"), "zeros"),
        norm2=ParamSpec((L, E), ("layers", "norm"), "ones"),
        gate_proj=ParamSpec((L, E, F), ("layers", "vision_embed", "vision_mlp")),
        gate_bias=ParamSpec((L, F), ("layers", "vision_mlp"), "zeros"),
        up_proj=ParamSpec((L, E, F), ("layers", "vision_embed", "vision_mlp")),
        up_bias=ParamSpec((L, F), ("layers", "vision_mlp"), "zeros"),
        down_proj=ParamSpec((L, F, E), ("layers", "vision_mlp", "vision_embed")),
        down_bias=ParamSpec((L, E), ("layers", "norm"), "zeros"),
    )
    return VisionWeights(
        patch_embed=ParamSpec((cfg.patch_dim, E), ("vision_patch", "vision_embed")),
        blocks=blocks,
        merger_norm=ParamSpec((E,), ("norm",), "ones"),
        merger_fc1=ParamSpec((M, M), ("merger_in", "merger_hidden")),
        merger_fc1_bias=ParamSpec((M,), ("merger_hidden",), "zeros"),
        merger_fc2=ParamSpec((M, cfg.out_hidden_size), ("merger_hidden", "embed")),
        merger_fc2_bias=ParamSpec((cfg.out_hidden_size,), ("norm",), "zeros"),
    )


def encode_images(
    weights: VisionWeights,
    cfg: VisionConfig,
    pixel_values: Any,
    image_grid_thw: Any,
    *,
    impl: str = "xla",
) -> jax.Array:
    """The vision tower: patches of every image -> merged features in the text width.

    Args:
      pixel_values: float32[P, C * T * p * p], HF's patch order.
      image_grid_thw: int[n_images, 3] (t, h, w) in patches.

    Returns:
      float32[P // merge_unit, out_hidden_size] (M merged tokens, images in order).
    """
    raise NotImplementedError(
        "the Qwen2.5-VL vision tower's forward pass is not implemented yet; pass text-only inputs"
    )
