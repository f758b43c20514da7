"""Rotary position embeddings for the text decoder (mRoPE) and its position ids.

mRoPE gives every token three position ids (t, h, w). Text tokens carry the same id on all
three; image tokens carry (start, start + row, start + column) over the merged grid. The
head_dim // 2 rotary frequencies are split into `mrope_section` = (t, h, w) consecutive
chunks (Qwen2-VL, Qwen2.5-VL) or interleaved t, h, w, t, h, w, ... (Qwen3-VL; see
`TextConfig.frequency_axes`), each frequency rotated by its axis' position id; the halves
are then duplicated, as in HF's rotate-half convention.

`get_rope_index` runs on the host (numpy): it reads token ids, which the processor produced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vlmgym_model.qwen2_5_vl.config import Qwen2_5_VLConfig, TextConfig


def inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """float32[H // 2]: theta ** (-2i / H)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)


def mrope_cos_sin(positions: jax.Array, config: TextConfig) -> tuple[jax.Array, jax.Array]:
    """cos and sin for mRoPE.

    Args:
      positions: int[3, B, T] (t, h, w) position ids.

    Returns:
      float32[B, T, H] cos and sin, the frequency halves duplicated (rotate-half layout).
    """
    inv_freq = jnp.asarray(inverse_frequencies(config.head_dim, config.rope_theta))
    # Which of the three position ids drives each frequency: section t, then h, then w
    # (chunked), or interleaved h/w for Qwen3-VL.
    axis_of_freq = np.asarray(config.frequency_axes())  # [H // 2]
    pos = positions.astype(jnp.float32)[axis_of_freq]  # [H // 2, B, T]
    freqs = jnp.moveaxis(pos, 0, -1) * inv_freq  # [B, T, H // 2]
    freqs = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, H]
    return jnp.cos(freqs), jnp.sin(freqs)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE in float32. x: [B, T, N, H]; cos, sin: [B, T, H]."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(dtype)


def get_rope_index(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    image_grid_thw: np.ndarray | None,
    config: Qwen2_5_VLConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """mRoPE position ids and decode deltas, following HF's `get_rope_index`.

    Args:
      input_ids: int[B, T]; image placeholders are `config.image_token_id`, one run of
        merged-token count per image, images in the order of `image_grid_thw`.
      attention_mask: int[B, T] (1 = token, 0 = padding) or None (no padding).
      image_grid_thw: int[n_images, 3] (t, h, w in patches) or None.

    Returns:
      positions int32[3, B, T] (padding positions are 0) and rope_deltas int32[B]: during
      decoding, the n-th real token of row b (counting from 0, padding excluded, prompt
      included) sits at position n + rope_deltas[b] on all three axes.
    """
    input_ids = np.asarray(input_ids)
    B, T = input_ids.shape
    mask = np.ones((B, T), bool) if attention_mask is None else np.asarray(attention_mask) != 0
    merge = config.vision.spatial_merge_size
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw)
    positions = np.zeros((3, B, T), np.int32)
    deltas = np.zeros((B,), np.int32)
    next_image = 0
    for b in range(B):
        ids = input_ids[b][mask[b]]
        is_image = ids == config.image_token_id
        pieces: list[np.ndarray] = []
        current = 0
        i = 0
        L = len(ids)
        while i < L:
            j = i
            while j < L and is_image[j] == is_image[i]:
                j += 1
            if not is_image[i]:
                pieces.append(np.broadcast_to(np.arange(j - i) + current, (3, j - i)))
                current += j - i
                i = j
                continue
            # A run of placeholders may hold several images back to back.
            while i < j:
                if next_image >= len(grids):
                    raise ValueError(
                        f"row {b} has more image placeholder runs than image_grid_thw rows "
                        f"({len(grids)})"
                    )
                t, h, w = (int(v) for v in grids[next_image])
                next_image += 1
                gh, gw = h // merge, w // merge
                n = t * gh * gw
                if i + n > j:
                    raise ValueError(
                        f"row {b}: image {next_image - 1} needs {n} placeholder tokens "
                        f"(grid {t}x{h}x{w} / {merge}x{merge} merge) but only {j - i} remain "
                        "in its run"
                    )
                tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
                pieces.append(np.stack([tt, hh, ww]).reshape(3, -1) + current)
                current += max(gh, gw)
                i += n
        row = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
        positions[:, b, mask[b]] = row
        deltas[b] = (int(row.max()) + 1 if row.size else 0) - L
    if next_image != len(grids):
        raise ValueError(
            f"image_grid_thw has {len(grids)} images but the placeholders in input_ids cover "
            f"{next_image}"
        )
    return positions, deltas
