"""The Qwen2.5-VL vision tower: weights, host-side layout and the jitted forward pass.

The tower is a ViT over 14x14 patches of two identical frames (a Conv3d with kernel =
stride = (2, 14, 14), i.e. a matmul over 1176 inputs), with 2D rotary embeddings, window
attention (full attention in the blocks of `fullatt_block_indexes`), RMSNorm, a SwiGLU MLP
with biases, and a merger (RMSNorm, 2x2 neighbours concatenated, Linear, GELU, Linear) into
the text width.

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
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import vlmgym_kernels

from vlmgym_model.matmul import einsum
from vlmgym_model.qwen2_5_vl.config import VisionConfig
from vlmgym_model.qwen2_5_vl.rope import apply_rope
from vlmgym_model.qwen2_5_vl.text import rms_norm
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


# ---------------------------------------------------------------------- host-side layout


@dataclasses.dataclass(frozen=True)
class VisionLayout:
    """Where every patch of a batch of images goes, computed on the host from the grids.

    Index arrays are numpy; "window order" is the order the blocks run in (HF's
    `get_window_index` applied to merge units), "HF order" that of `pixel_values`.
    """

    patch_order: np.ndarray  # int32[P]: window-order slot -> HF patch index
    unit_inverse: np.ndarray  # int32[P // merge_unit]: HF merge unit -> window-order unit
    positions: np.ndarray  # int32[P, 2]: (row, column) rotary ids, window order
    window_segments: np.ndarray  # int32[P]: one id per window (from 1), window order
    image_segments: np.ndarray  # int32[P]: one id per image frame (from 1), window order
    max_window_len: int  # static bound on a window's patches (window_units**2 * merge_unit)
    max_image_len: int  # static bound on a frame's patches (bucketed, <= P)

    @property
    def num_patches(self) -> int:
        return len(self.patch_order)

    @property
    def window_index(self) -> np.ndarray:
        """int[P // merge_unit]: HF's `window_index` (window-order unit -> HF merge unit)."""
        return np.argsort(self.unit_inverse)


def _check_grids(grids: np.ndarray, cfg: VisionConfig) -> np.ndarray:
    grids = np.asarray(grids, np.int64).reshape(-1, 3)
    m = cfg.spatial_merge_size
    bad = [tuple(int(v) for v in g) for g in grids if g.min() <= 0 or g[1] % m or g[2] % m]
    if bad:
        raise ValueError(
            f"image_grid_thw rows {bad} are not valid patch grids: t, h, w must be positive and "
            f"h, w multiples of spatial_merge_size={m}"
        )
    return grids


def unit_window_order(grid_thw: tuple[int, int, int], cfg: VisionConfig) -> np.ndarray:
    """HF's window ordering of one image's merge units, and each unit's window.

    Merge units (2x2 patches) of frame t, row r, column c, in HF order u = (t * h' + r) * w'
    + c, are grouped into windows of `window_units` x `window_units` units (the last row
    and column of windows may be partial), windows row-major within a frame, units
    row-major within a window.

    Returns:
      int64[2, t * h' * w']: row 0 the HF unit index in window order, row 1 the window
      number (from 0, counted over the image's frames) of each of those units.
    """
    t, h, w = grid_thw
    m, n = cfg.spatial_merge_size, cfg.window_units
    gh, gw = h // m, w // m
    tt, rr, cc = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
    tt, rr, cc = tt.ravel(), rr.ravel(), cc.ravel()  # HF unit order
    nwh, nww = -(-gh // n), -(-gw // n)  # windows per column and per row
    window = (tt * nwh + rr // n) * nww + cc // n  # [U]
    order = np.lexsort((cc, rr, window))  # window-major, then row-major inside the window
    return np.stack([order, window[order]])


def _patch_rows_cols(grid_thw: tuple[int, int, int], merge: int) -> np.ndarray:
    """int64[t * h * w, 2]: (row, column) of each patch of one image, HF's patch order."""
    t, h, w = grid_thw
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")  # [h, w]

    def by_units(a: np.ndarray) -> np.ndarray:
        # [h, w] -> [h/m, w/m, m, m] -> flat: merge units row-major, patches row-major inside.
        return a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).ravel()

    rc = np.stack([by_units(rows), by_units(cols)], axis=-1)  # [h * w, 2]
    return np.tile(rc, (t, 1))  # [t * h * w, 2]


def _bucket(n: int, limit: int) -> int:
    """The next power of two >= n, capped at `limit`: few distinct static bounds."""
    return min(1 << max(0, int(n) - 1).bit_length(), limit)


@functools.lru_cache(maxsize=64)
def _layout_cached(grids: tuple[tuple[int, int, int], ...], cfg: VisionConfig) -> VisionLayout:
    mu = cfg.merge_unit
    unit_order, window_ids, frame_ids, positions = [], [], [], []
    units_before = windows_before = frames_before = 0
    for grid in grids:
        t, h, w = grid
        order, window = unit_window_order(grid, cfg)
        unit_order.append(order + units_before)
        window_ids.append(window + windows_before)
        units_per_frame = h * w // mu
        frame_ids.append(order // units_per_frame + frames_before)
        positions.append(_patch_rows_cols(grid, cfg.spatial_merge_size))
        units_before += len(order)
        windows_before += int(window.max()) + 1
        frames_before += t
    units = np.concatenate(unit_order)  # [U]
    patch_order = (units[:, None] * mu + np.arange(mu)).ravel()  # [P]
    rc = np.concatenate(positions)[patch_order]  # [P, 2]
    window_seg = np.repeat(np.concatenate(window_ids) + 1, mu)  # [P]
    image_seg = np.repeat(np.concatenate(frame_ids) + 1, mu)  # [P]
    P = len(patch_order)
    largest = max(h * w for _, h, w in grids)

    def frozen(a: np.ndarray) -> np.ndarray:
        a = a.astype(np.int32)
        a.setflags(write=False)  # the layout is cached and shared between callers
        return a

    return VisionLayout(
        patch_order=frozen(patch_order),
        unit_inverse=frozen(np.argsort(units)),
        positions=frozen(rc),
        window_segments=frozen(window_seg),
        image_segments=frozen(image_seg),
        max_window_len=min(cfg.window_units**2 * mu, P),
        max_image_len=_bucket(largest, P),
    )


def vision_layout(image_grid_thw: Any, cfg: VisionConfig) -> VisionLayout:
    """The host-side layout of a batch of images (see `VisionLayout`).

    Args:
      image_grid_thw: int[n_images, 3] (t, h, w) in patches, images in `pixel_values` order.
    """
    grids = _check_grids(np.asarray(image_grid_thw), cfg)
    if not len(grids):
        raise ValueError("vision_layout needs at least one image")
    key = tuple(tuple(int(v) for v in g) for g in grids)
    return _layout_cached(key, cfg)


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
    q = einsum("PD,DNH->PNH", h, layer.qkv_proj[:, 0]) + layer.qkv_bias[0]  # [P, N, H]
    k = einsum("PD,DNH->PNH", h, layer.qkv_proj[:, 1]) + layer.qkv_bias[1]  # [P, N, H]
    v = einsum("PD,DNH->PNH", h, layer.qkv_proj[:, 2]) + layer.qkv_bias[2]  # [P, N, H]
    q = apply_rope(q[None], cos[None], sin[None])[0]
    k = apply_rope(k[None], cos[None], sin[None])[0]
    return q, k, v


def _mlp(layer: VisionBlocks, h: jax.Array) -> jax.Array:
    """SwiGLU with biases: down(silu(gate(h)) * up(h)). h [P, D] -> [P, D]."""
    gate = einsum("PD,DF->PF", h, layer.gate_proj) + layer.gate_bias  # [P, F]
    up = einsum("PD,DF->PF", h, layer.up_proj) + layer.up_bias  # [P, F]
    return einsum("PF,FD->PD", jax.nn.silu(gate) * up, layer.down_proj) + layer.down_bias


def merge_patches(weights: VisionWeights, x: jax.Array, cfg: VisionConfig) -> jax.Array:
    """The merger: RMSNorm, each 2x2 unit's four patches concatenated, Linear, GELU, Linear.

    Args:
      x: [P, D] tower output; consecutive groups of `merge_unit` patches form a unit.

    Returns:
      float32[M, out_hidden_size], M = P // merge_unit, in x's unit order.
    """
    h = rms_norm(x, weights.merger_norm, cfg.rms_norm_eps)
    h = h.reshape(x.shape[0] // cfg.merge_unit, -1)  # [M, C]: C = 4D, a unit's patches
    h = einsum("MC,CF->MF", h, weights.merger_fc1) + weights.merger_fc1_bias  # [M, 4D]
    h = jax.nn.gelu(h, approximate=False)
    out = jnp.einsum(
        "MF,FD->MD", h, weights.merger_fc2, preferred_element_type=jnp.float32
    )  # [M, D_text]
    return out + weights.merger_fc2_bias.astype(jnp.float32)


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
    *,
    cfg: VisionConfig,
    impl: str,
    max_window_len: int,
    max_image_len: int,
    remat: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """The whole tower on a batch of images, laid out by `vision_layout`.

    Args:
      pixel_values: float[P, C * T * p * p] patches in HF's order.
      patch_order, unit_inverse, positions, window_segments, image_segments: the
        `VisionLayout` fields (int32).
      max_window_len, max_image_len: static segment-length bounds for the attention.
      remat: recompute each block's activations in the backward pass.

    Returns:
      hidden: [P, D] the last block's output (before the merger), in window order (HF's
        `last_hidden_state`);
      features: float32[M, out_hidden_size] merged features in HF's unit order, images in
        order (HF's `pooler_output`).
    """
    dtype = weights.patch_embed.dtype
    x = einsum("PC,CD->PD", pixel_values.astype(dtype), weights.patch_embed)  # [P, D]
    x = x[patch_order]  # [P, D] window order
    cos, sin = rotary_cos_sin(positions, cfg)  # [P, H]
    L = cfg.depth
    is_full = jnp.asarray(np.isin(np.arange(L), cfg.fullatt_block_indexes))  # [L]

    def attend(segments: jax.Array, bound: int) -> Any:
        def run(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
            return vlmgym_kernels.vision_attention(
                q, k, v, segments, max_segment_len=bound, impl=impl
            )  # [P, N, H]

        return run

    window_attention = attend(window_segments, max_window_len)
    full_attention = attend(image_segments, max_image_len)

    def block(x: jax.Array, scanned: tuple[VisionBlocks, jax.Array]) -> tuple[jax.Array, None]:
        layer, full = scanned
        h = rms_norm(x, layer.norm1, cfg.rms_norm_eps)
        q, k, v = _attention_qkv(layer, h, cos, sin)
        attn = jax.lax.cond(full, full_attention, window_attention, q, k, v)  # [P, N, H]
        P, N, H = attn.shape
        o_proj = layer.o_proj.reshape(N * H, -1)  # [N*H, E]: one plain matmul (see text.py)
        x = x + einsum("PE,ED->PD", attn.reshape(P, N * H), o_proj) + layer.o_bias
        x = x + _mlp(layer, rms_norm(x, layer.norm2, cfg.rms_norm_eps))
        return x, None

    if remat:
        block = jax.checkpoint(block, prevent_cse=False)
    x, _ = jax.lax.scan(block, x, (weights.blocks, is_full))
    features = merge_patches(weights, x, cfg)[unit_inverse]  # [M, D_text]
    return x, features


def run_vision_tower(
    weights: VisionWeights,
    cfg: VisionConfig,
    pixel_values: Any,
    image_grid_thw: Any,
    *,
    impl: str = "xla",
) -> tuple[jax.Array, jax.Array]:
    """`vision_tower` on raw processor outputs: (hidden [P, D], features float32[M, D_text])."""
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
    _, features = run_vision_tower(weights, cfg, pixel_values, image_grid_thw, impl=impl)
    return features
