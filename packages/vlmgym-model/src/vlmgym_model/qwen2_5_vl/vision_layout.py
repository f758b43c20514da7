"""The vision tower's host-side layout: where every patch of a batch of images goes.

Everything that depends on the image sizes is computed here, on the host, in numpy, from
`image_grid_thw`: the window permutation of HF's `get_window_index` and its inverse, the
(row, column) rotary ids, one segment id per window and one per image frame, and (Qwen3-VL)
the taps and weights that resample the learned position table to each image. Layouts are
cached per grid tuple.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np

from vlmgym_model.qwen2_5_vl.config import VisionConfig

__all__ = ["VisionLayout", "position_taps", "unit_window_order", "vision_layout"]


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
    pos_index: np.ndarray | None = None  # int32[P, 4]: position-table taps, HF patch order
    pos_weight: np.ndarray | None = None  # float32[P, 4]: their bilinear weights

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
    if not n:  # no windows: HF's order, one "window" per frame
        return np.stack([np.arange(len(tt)), tt])
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


def position_taps(
    grid_thw: tuple[int, int, int], side: int, merge: int
) -> tuple[np.ndarray, np.ndarray]:
    """Qwen3-VL's learned position table resampled to one image: bilinear with
    align_corners=True from the side x side table to the h x w grid, as (int32[t*h*w, 4]
    table rows, float32[t*h*w, 4] weights) per patch in HF's patch order (merge units,
    frames repeated). The same arithmetic as transformers' float32 torch code.
    """
    t, h, w = grid_thw
    rc = _patch_rows_cols((1, h, w), merge)  # [h * w, 2]

    def axis(index: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
        floor = np.floor(src)
        taps = np.clip(floor.astype(np.int64)[:, None] + np.arange(2), 0, side - 1)
        distance = np.abs(src[:, None] - floor[:, None] - np.arange(2, dtype=np.float32))
        return taps, np.maximum(np.float32(1) - distance, np.float32(0))

    h_taps, h_w = axis(rc[:, 0], h)
    w_taps, w_w = axis(rc[:, 1], w)
    index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weight = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4).astype(np.float32)
    return np.tile(index, (t, 1)), np.tile(weight, (t, 1))


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

    def frozen(a: np.ndarray, dtype: Any = np.int32) -> np.ndarray:
        a = a.astype(dtype)
        a.setflags(write=False)  # the layout is cached and shared between callers
        return a

    max_image_len = _bucket(largest, P)
    pos_index = pos_weight = None
    if cfg.num_position_embeddings:
        side = math.isqrt(cfg.num_position_embeddings)
        taps = [position_taps(g, side, cfg.spatial_merge_size) for g in grids]
        pos_index = frozen(np.concatenate([i for i, _ in taps]))
        pos_weight = frozen(np.concatenate([w for _, w in taps]), np.float32)
    return VisionLayout(
        patch_order=frozen(patch_order),
        unit_inverse=frozen(np.argsort(units)),
        positions=frozen(rc),
        window_segments=frozen(window_seg),
        image_segments=frozen(image_seg),
        max_window_len=min(cfg.window_units**2 * mu, P) if cfg.window_size else max_image_len,
        max_image_len=max_image_len,
        pos_index=pos_index,
        pos_weight=pos_weight,
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
