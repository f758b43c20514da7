"""The vision tower of every Qwen-VL family: weights, host-side layout, jitted forward.

The tower is a ViT over p x p patches of two identical frames (a Conv3d with kernel =
stride = (2, p, p), i.e. a matmul over 2 * 3 * p * p inputs), with 2D rotary embeddings
and a merger (norm, 2x2 neighbours concatenated, Linear, GELU, Linear) into the text width.
The families differ in switches of `VisionConfig`:
- Qwen2.5-VL: p = 14, RMSNorm, a SwiGLU MLP with biases, window attention (full attention
  in the blocks of `fullatt_block_indexes`).
- Qwen2-VL: p = 14, LayerNorm, fc1 -> QuickGELU -> fc2, full attention within each image.
- Qwen3-VL: p = 16, LayerNorm, fc1 -> GELU(tanh) -> fc2, full attention, a Conv3d bias, a
  learned square table of position embeddings resampled bilinearly (align_corners) to each
  image's grid and added to the patch embeddings, and DeepStack: the outputs of the blocks
  in `deepstack_visual_indexes` go through mergers of their own (LayerNorm after the 2x2
  concatenation) and feed the first decoder layers.

What is notable here:
- Everything that depends on the image sizes is computed on the host, in numpy, from
  `image_grid_thw` (`vision_layout`): the window permutation of HF's `get_window_index` and
  its inverse, the (row, column) rotary ids, and two segment-id vectors, one id per window
  (window blocks) and one per image frame (full-attention blocks). Attention never crosses
  a segment, hence never an image.
- The blocks then run in ONE jitted function (`vision_tower`): a `lax.scan` over the
  layer-stacked weights, where a scanned boolean picks window or full attention with
  `lax.cond`. No Python loop over images or windows; static shapes depend only on the patch
  count P and two bucketed segment-length bounds, so equal P and bucket never recompile.
- Patches live in HF's order inside `pixel_values` (each 2x2 merge unit's four patches are
  consecutive). The tower runs in window order (windows of `window_units` x `window_units`
  merge units, row-major inside a window, windows row-major inside an image frame); the
  merger works on consecutive groups of four patches, and its output is put back in HF's
  merge-unit order at the end.
- Norms, rotary and softmax run in float32; the merger's GELU is exact (erf).
- Without windows (Qwen2-VL, Qwen3-VL) the window order is HF's order and every block
  attends within each image frame.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import vlmgym_kernels

from vlmgym_model.lora import reshape_in, select_out
from vlmgym_model.matmul import einsum
from vlmgym_model.qwen2_5_vl.config import VisionConfig
from vlmgym_model.qwen2_5_vl.rope import apply_rope
from vlmgym_model.qwen2_5_vl.text import rms_norm
from vlmgym_model.qwen2_5_vl.vision_layout import vision_layout
from vlmgym_model.weights import ParamSpec


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class VisionBlocks:
    """All vision blocks, stacked on a leading L axis (E: vision width, F: its MLP width).

    The MLP is SwiGLU (gate, up, down) or, without `gate_proj`, fc1 (`up`) -> act -> fc2
    (`down`). Norm biases exist for LayerNorm towers only.
    """

    norm1: jax.Array  # [L, E]
    qkv_proj: jax.Array  # [L, E, 3, N, H]
    qkv_bias: jax.Array  # [L, 3, N, H]
    o_proj: jax.Array  # [L, N, H, E]
    o_bias: jax.Array  # [L, E]
    norm2: jax.Array  # [L, E]
    up_proj: jax.Array  # [L, E, F]
    up_bias: jax.Array  # [L, F]
    down_proj: jax.Array  # [L, F, E]
    down_bias: jax.Array  # [L, E]
    gate_proj: jax.Array | None = None  # [L, E, F] (SwiGLU)
    gate_bias: jax.Array | None = None  # [L, F]
    norm1_bias: jax.Array | None = None  # [L, E] (LayerNorm)
    norm2_bias: jax.Array | None = None  # [L, E]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DeepstackMergers:
    """Qwen3-VL's DeepStack mergers, stacked on a leading k axis (LayerNorm after the 2x2
    concatenation, over 4E)."""

    norm: jax.Array  # [k, 4E]
    norm_bias: jax.Array  # [k, 4E]
    fc1: jax.Array  # [k, 4E, 4E]
    fc1_bias: jax.Array  # [k, 4E]
    fc2: jax.Array  # [k, 4E, D]
    fc2_bias: jax.Array  # [k, D]


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
    patch_bias: jax.Array | None = None  # [E] (Qwen3-VL)
    pos_embed: jax.Array | None = None  # [side * side, E] (Qwen3-VL)
    merger_norm_bias: jax.Array | None = None  # [E] (LayerNorm)
    deepstack: DeepstackMergers | None = None


def vision_param_specs(cfg: VisionConfig) -> VisionWeights:
    """The shape, logical axes and initialiser of every vision weight."""
    L, E, F = cfg.depth, cfg.hidden_size, cfg.intermediate_size
    N, H = cfg.num_heads, cfg.head_dim
    M = E * cfg.merge_unit
    layer_norm = cfg.norm == "layer"

    def norm_bias(*shape: int) -> ParamSpec | None:
        axes = ("layers", "norm") if len(shape) == 2 else ("norm",)
        return ParamSpec(shape, axes, "zeros") if layer_norm else None

    gated = cfg.gated_mlp
    blocks = VisionBlocks(
        norm1=ParamSpec((L, E), ("layers", "norm"), "ones"),
        norm1_bias=norm_bias(L, E),
        norm2_bias=norm_bias(L, E),
        qkv_proj=ParamSpec(
            (L, E, 3, N, H), ("layers", "vision_embed", "vision_qkv", "vision_heads", "head_dim")
        ),
        qkv_bias=ParamSpec(
            (L, 3, N, H), ("layers", "vision_qkv", "vision_heads", "head_dim"), "zeros"
        ),
        o_proj=ParamSpec((L, N, H, E), ("layers", "vision_heads", "head_dim", "vision_embed")),
        o_bias=ParamSpec((L, E), ("layers", "norm"), "zeros"),
        norm2=ParamSpec((L, E), ("layers", "norm"), "ones"),
        gate_proj=ParamSpec((L, E, F), ("layers", "vision_embed", "vision_mlp")) if gated else None,
        gate_bias=ParamSpec((L, F), ("layers", "vision_mlp"), "zeros") if gated else None,
        up_proj=ParamSpec((L, E, F), ("layers", "vision_embed", "vision_mlp")),
        up_bias=ParamSpec((L, F), ("layers", "vision_mlp"), "zeros"),
        down_proj=ParamSpec((L, F, E), ("layers", "vision_mlp", "vision_embed")),
        down_bias=ParamSpec((L, E), ("layers", "norm"), "zeros"),
    )
    k, D = len(cfg.deepstack_visual_indexes), cfg.out_hidden_size
    deepstack = None
    if k:
        deepstack = DeepstackMergers(
            norm=ParamSpec((k, M), ("layers", "norm"), "ones"),
            norm_bias=ParamSpec((k, M), ("layers", "norm"), "zeros"),
            fc1=ParamSpec((k, M, M), ("layers", "merger_in", "merger_hidden")),
            fc1_bias=ParamSpec((k, M), ("layers", "merger_hidden"), "zeros"),
            fc2=ParamSpec((k, M, D), ("layers", "merger_hidden", "embed")),
            fc2_bias=ParamSpec((k, D), ("layers", "norm"), "zeros"),
        )
    positions = cfg.num_position_embeddings
    return VisionWeights(
        patch_embed=ParamSpec((cfg.patch_dim, E), ("vision_patch", "vision_embed")),
        patch_bias=ParamSpec((E,), ("norm",), "zeros") if cfg.patch_bias else None,
        pos_embed=ParamSpec((positions, E), ("vision_positions", "vision_embed"))
        if positions
        else None,
        blocks=blocks,
        merger_norm=ParamSpec((E,), ("norm",), "ones"),
        merger_norm_bias=norm_bias(E),
        merger_fc1=ParamSpec((M, M), ("merger_in", "merger_hidden")),
        merger_fc1_bias=ParamSpec((M,), ("merger_hidden",), "zeros"),
        merger_fc2=ParamSpec((M, D), ("merger_hidden", "embed")),
        merger_fc2_bias=ParamSpec((D,), ("norm",), "zeros"),
        deepstack=deepstack,
    )


def rotary_cos_sin(positions: jax.Array, cfg: VisionConfig) -> tuple[jax.Array, jax.Array]:
    """The 2D vision rotary tables.

    The head_dim // 4 frequencies theta ** (-4i / head_dim) are applied once to the row id
    and once to the column id; the two halves are concatenated (rows first) and then
    duplicated for the rotate-half convention.

    Args:
      positions: int[P, 2] (row, column) ids.

    Returns:
      float32[P, H] cos and sin.
    """
    quarter = cfg.head_dim // 4
    exponents = np.arange(quarter, dtype=np.float32) * 2 / np.float32(cfg.head_dim // 2)
    inv_freq = jnp.asarray(1.0 / (np.float32(cfg.rope_theta) ** exponents))  # [H // 4]
    freqs = positions.astype(jnp.float32)[:, :, None] * inv_freq  # [P, 2, H // 4]
    freqs = freqs.reshape(positions.shape[0], 2 * quarter)  # [P, H // 2]
    freqs = jnp.concatenate([freqs, freqs], axis=-1)  # [P, H]
    return jnp.cos(freqs), jnp.sin(freqs)


# ---------------------------------------------------------------------- forward (jitted)


def _attention_qkv(
    layer: VisionBlocks, h: jax.Array, cos: jax.Array, sin: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """h [P, D] -> q, k, v [P, N, H], with the 2D rotary applied to q and k."""
    q = einsum("PD,DNH->PNH", h, select_out(layer.qkv_proj, 0)) + layer.qkv_bias[0]  # [P, N, H]
    k = einsum("PD,DNH->PNH", h, select_out(layer.qkv_proj, 1)) + layer.qkv_bias[1]  # [P, N, H]
    v = einsum("PD,DNH->PNH", h, select_out(layer.qkv_proj, 2)) + layer.qkv_bias[2]  # [P, N, H]
    q = apply_rope(q[None], cos[None], sin[None])[0]
    k = apply_rope(k[None], cos[None], sin[None])[0]
    return q, k, v


def norm(x: jax.Array, weight: jax.Array, bias: jax.Array | None, eps: float) -> jax.Array:
    """RMSNorm without a bias, LayerNorm with one; float32 inside, x's dtype out."""
    if bias is None:
        return rms_norm(x, weight, eps)
    dtype = x.dtype
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    x = (x - mean) * jax.lax.rsqrt(var + eps)
    return (x * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)


def _activation(name: str, x: jax.Array) -> jax.Array:
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    return jax.nn.gelu(x, approximate=True)  # gelu_pytorch_tanh


def _mlp(layer: VisionBlocks, h: jax.Array, act: str) -> jax.Array:
    """SwiGLU with biases, down(silu(gate(h)) * up(h)), or fc2(act(fc1(h))): [P, E] -> [P, E]."""
    up = einsum("PD,DF->PF", h, layer.up_proj) + layer.up_bias  # [P, F]
    if layer.gate_proj is None:
        hidden = _activation(act, up)
    else:
        gate = einsum("PD,DF->PF", h, layer.gate_proj) + layer.gate_bias  # [P, F]
        hidden = jax.nn.silu(gate) * up
    return einsum("PF,FD->PD", hidden, layer.down_proj) + layer.down_bias


def _merge(
    h: jax.Array, fc1: jax.Array, fc1_bias: jax.Array, fc2: jax.Array, fc2_bias: jax.Array
) -> jax.Array:
    """Linear, exact GELU, Linear on [M, 4E] -> float32[M, D]."""
    h = einsum("MC,CF->MF", h, fc1) + fc1_bias  # [M, 4E]
    h = jax.nn.gelu(h, approximate=False)
    out = jnp.einsum("MF,FD->MD", h, fc2, preferred_element_type=jnp.float32)  # [M, D_text]
    return out + fc2_bias.astype(jnp.float32)


def merge_patches(weights: VisionWeights, x: jax.Array, cfg: VisionConfig) -> jax.Array:
    """The merger: norm, each 2x2 unit's four patches concatenated, Linear, GELU, Linear.

    Args:
      x: [P, D] tower output; consecutive groups of `merge_unit` patches form a unit.

    Returns:
      float32[M, out_hidden_size], M = P // merge_unit, in x's unit order.
    """
    h = norm(x, weights.merger_norm, weights.merger_norm_bias, cfg.rms_norm_eps)
    h = h.reshape(x.shape[0] // cfg.merge_unit, -1)  # [M, C]: C = 4D, a unit's patches
    w = weights
    return _merge(h, w.merger_fc1, w.merger_fc1_bias, w.merger_fc2, w.merger_fc2_bias)


def merge_deepstack(
    mergers: DeepstackMergers, j: int, x: jax.Array, cfg: VisionConfig
) -> jax.Array:
    """DeepStack merger j: the 2x2 concatenation first, then LayerNorm over 4E, Linear,
    GELU, Linear. x [P, E] -> float32[M, out_hidden_size], x's unit order."""
    h = x.reshape(x.shape[0] // cfg.merge_unit, -1)  # [M, 4E]
    m = jax.tree.map(lambda a: a[j], mergers)
    h = norm(h, m.norm, m.norm_bias, cfg.rms_norm_eps)
    return _merge(h, m.fc1, m.fc1_bias, m.fc2, m.fc2_bias)


def _segments(cfg: VisionConfig) -> list[tuple[int, int, int | None]]:
    """The blocks as consecutive runs [start, stop), each ending at a DeepStack layer (with
    its merger's index) or at the last block (None)."""
    taps = sorted(cfg.deepstack_visual_indexes)
    runs, start = [], 0
    for layer in taps:
        runs.append((start, layer + 1, cfg.deepstack_visual_indexes.index(layer)))
        start = layer + 1
    if start < cfg.depth:
        runs.append((start, cfg.depth, None))
    return runs


def _block_fn(
    cfg: VisionConfig,
    cos: jax.Array,
    sin: jax.Array,
    windows: tuple[jax.Array, int],
    images: tuple[jax.Array, int],
    impl: str,
) -> Any:
    """The scanned block: (x [P, E], (layer, is_full)) -> (x, None). `windows` and `images`
    are (segment ids [P], static segment-length bound) of the two attention kinds."""

    def attend(segments: jax.Array, bound: int) -> Any:
        def run(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
            return vlmgym_kernels.vision_attention(
                q, k, v, segments, max_segment_len=bound, impl=impl
            )  # [P, N, H]

        return run

    window_attention = attend(*windows)
    full_attention = attend(*images)
    eps = cfg.rms_norm_eps

    def block(x: jax.Array, scanned: tuple[VisionBlocks, jax.Array]) -> tuple[jax.Array, None]:
        layer, full = scanned
        h = norm(x, layer.norm1, layer.norm1_bias, eps)
        q, k, v = _attention_qkv(layer, h, cos, sin)
        if cfg.window_size:
            attn = jax.lax.cond(full, full_attention, window_attention, q, k, v)
        else:
            attn = full_attention(q, k, v)  # [P, N, H]
        P, N, H = attn.shape
        o_proj = reshape_in(layer.o_proj, N * H)  # [N*H, E]: one plain matmul (see text.py)
        x = x + einsum("PE,ED->PD", attn.reshape(P, N * H), o_proj) + layer.o_bias
        x = x + _mlp(layer, norm(x, layer.norm2, layer.norm2_bias, eps), cfg.hidden_act)
        return x, None

    return block


@functools.partial(
    jax.jit, static_argnames=("cfg", "impl", "max_window_len", "max_image_len", "remat")
)
def vision_tower(
    weights: VisionWeights,
    pixel_values: jax.Array,
    patch_order: jax.Array,
    unit_inverse: jax.Array,
    positions: jax.Array,
    window_segments: jax.Array,
    image_segments: jax.Array,
    pos_index: jax.Array | None = None,
    pos_weight: jax.Array | None = None,
    *,
    cfg: VisionConfig,
    impl: str,
    max_window_len: int,
    max_image_len: int,
    remat: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """The whole tower on a batch of images, laid out by `vision_layout`.

    Args:
      pixel_values: float[P, C * T * p * p] patches in HF's order.
      patch_order, unit_inverse, positions, window_segments, image_segments, pos_index,
        pos_weight: the `VisionLayout` fields (the last two for a learned position table).
      max_window_len, max_image_len: static segment-length bounds for the attention.
      remat: recompute each block's activations in the backward pass.

    Returns:
      hidden: [P, D] the last block's output (before the merger), in window order (HF's
        `last_hidden_state`);
      features: float32[M, out_hidden_size] merged features in HF's unit order, images in
        order (HF's `pooler_output`);
      deepstack: float32[k, M, out_hidden_size] the DeepStack mergers' features in HF's
        unit order, in decoder-layer order, or None.
    """
    dtype = weights.patch_embed.dtype
    x = einsum("PC,CD->PD", pixel_values.astype(dtype), weights.patch_embed)  # [P, D]
    if weights.patch_bias is not None:
        x = x + weights.patch_bias
    if weights.pos_embed is not None:
        assert pos_index is not None and pos_weight is not None
        table = weights.pos_embed[pos_index]  # [P, 4, D]
        x = x + jnp.sum(table * pos_weight[:, :, None], axis=1).astype(x.dtype)
    x = x[patch_order]  # [P, D] window order
    cos, sin = rotary_cos_sin(positions, cfg)  # [P, H]
    is_full = jnp.asarray(np.isin(np.arange(cfg.depth), cfg.full_attention_blocks))  # [L]

    block = _block_fn(
        cfg, cos, sin, (window_segments, max_window_len), (image_segments, max_image_len), impl
    )
    if remat:
        block = jax.checkpoint(block, prevent_cse=False)
    deepstack: list[tuple[int, jax.Array]] = []
    for start, stop, merger in _segments(cfg):
        run = jax.tree.map(lambda a, start=start, stop=stop: a[start:stop], weights.blocks)
        x, _ = jax.lax.scan(block, x, (run, is_full[start:stop]))
        if merger is not None:
            assert weights.deepstack is not None
            features = merge_deepstack(weights.deepstack, merger, x, cfg)[unit_inverse]
            deepstack.append((merger, features))
    features = merge_patches(weights, x, cfg)[unit_inverse]  # [M, D_text]
    stacked = jnp.stack([f for _, f in deepstack]) if deepstack else None  # [k, M, D]
    return x, features, stacked


def run_vision_tower(
    weights: VisionWeights,
    cfg: VisionConfig,
    pixel_values: Any,
    image_grid_thw: Any,
    *,
    impl: str = "xla",
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """`vision_tower` on raw processor outputs: (hidden [P, D], features float32[M, D_text],
    DeepStack features float32[k, M, D_text] or None)."""
    layout = vision_layout(image_grid_thw, cfg)
    pixels = jnp.asarray(pixel_values)
    expected = (layout.num_patches, cfg.patch_dim)
    if pixels.shape != expected:
        raise ValueError(
            f"pixel_values has shape {tuple(pixels.shape)}, but image_grid_thw describes "
            f"{layout.num_patches} patches of {cfg.patch_dim} values: expected {expected}"
        )
    return vision_tower(
        weights,
        pixels,
        jnp.asarray(layout.patch_order),
        jnp.asarray(layout.unit_inverse),
        jnp.asarray(layout.positions),
        jnp.asarray(layout.window_segments),
        jnp.asarray(layout.image_segments),
        layout.pos_index,
        layout.pos_weight,
        cfg=cfg,
        impl=impl,
        max_window_len=layout.max_window_len,
        max_image_len=layout.max_image_len,
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
    _, features, _ = run_vision_tower(weights, cfg, pixel_values, image_grid_thw, impl=impl)
    return features
