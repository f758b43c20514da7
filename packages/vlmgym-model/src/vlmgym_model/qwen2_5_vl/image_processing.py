"""Qwen2.5-VL image preprocessing in numpy + Pillow (no torch, no transformers).

What is notable here:
- Output matches HF's `Qwen2VLImageProcessorPil` bit for bit on uint8 inputs: the same RGB
  conversion (transparency composited onto white), the same `smart_resize` (factor 28, Python's
  round-half-to-even), the same Pillow resampling on the uint8 image, and rescale + normalise
  replayed exactly in HF's arithmetic (float64 rescale, cast to float32, float32 normalise).
- Rescale and normalise are one lookup table per channel: a uint8 input has only 256 values, so
  `(v * rescale - mean) / std` is computed once per value and gathered, in float32.
- The patch reorder is one reshape/transpose of the uint8 image (cheap: 1 byte per element); the
  two identical temporal frames are two contiguous copies into the preallocated output.
- Images are processed on a small thread pool (Pillow's resize and numpy's gather release the GIL),
  each writing straight into its slice of one `[P, 1176]` buffer.

Patch order (HF's): for each image, merge units row-major over the `(H/28, W/28)` grid, the 2x2
patches of a unit row-major inside it, and each patch's 1176 values ordered `(C, T, 14, 14)`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

PREPROCESSOR_CONFIG_FILE = "preprocessor_config.json"

# Largest ratio between an image's long and short side that `smart_resize` accepts (HF's limit).
MAX_ASPECT_RATIO = 200

ImageLike = Image.Image | np.ndarray


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 14 * 14 * 4 * 1280,
) -> tuple[int, int]:
    """The `(height, width)` Qwen2.5-VL resizes an image to, exactly as HF computes it.

    Both sides become multiples of `factor`, the area lands in `[min_pixels, max_pixels]`, and the
    aspect ratio is kept as closely as that allows. Python's `round` (half to even) is part of the
    contract: it decides the grid of images whose sides are odd multiples of `factor / 2`.

    Raises:
        ValueError: a side is not positive, or the aspect ratio exceeds 200.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image sides must be positive, got height={height}, width={width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got "
            f"{max(height, width) / min(height, width)} for height={height}, width={width}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class ImageProcessorConfig:
    """Qwen2.5-VL's image preprocessing settings, as in HF's `preprocessor_config.json`.

    Defaults are Qwen2.5-VL's published ones. `resample` is a Pillow resampling filter id
    (3 = BICUBIC).
    """

    min_pixels: int = 3136
    max_pixels: int = 12845056
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int = int(Image.Resampling.BICUBIC)

    def __post_init__(self) -> None:
        for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})"
            )
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(
                f"image_mean and image_std need 3 values (RGB), got {self.image_mean}, "
                f"{self.image_std}"
            )
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std must be non-zero, got {self.image_std}")
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))

    @property
    def factor(self) -> int:
        """Side granularity of resized images: `patch_size * merge_size` (28)."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Values per patch row of `pixel_values`: `3 * temporal_patch_size * patch_size**2`."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> ImageProcessorConfig:
        """Read HF's `preprocessor_config.json` contents.

        Pixel bounds come from `min_pixels`/`max_pixels` when present, else from
        `size: {shortest_edge, longest_edge}` (the newer layout; the older `size:
        {min_pixels, max_pixels}` is accepted too), else the defaults. Unknown keys are ignored.
        """
        kwargs: dict[str, Any] = {}
        size = config.get("size") or {}
        if isinstance(size, Mapping):
            lo = size.get("shortest_edge", size.get("min_pixels"))
            hi = size.get("longest_edge", size.get("max_pixels"))
            if lo is not None:
                kwargs["min_pixels"] = int(lo)
            if hi is not None:
                kwargs["max_pixels"] = int(hi)
        for key in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            if config.get(key) is not None:
                kwargs[key] = int(config[key])
        for key in ("image_mean", "image_std"):
            if config.get(key) is not None:
                value = config[key]
                kwargs[key] = tuple(value) if isinstance(value, Sequence) else (value,) * 3
        if config.get("rescale_factor") is not None:
            kwargs["rescale_factor"] = float(config["rescale_factor"])
        for key in ("do_resize", "do_rescale", "do_normalize"):
            if config.get(key) is not None:
                kwargs[key] = bool(config[key])
        if config.get("resample") is not None:
            kwargs["resample"] = int(config["resample"])
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> ImageProcessorConfig:
        """Read a `preprocessor_config.json` file."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike[str]) -> ImageProcessorConfig:
        """Read `model_dir/preprocessor_config.json`; the defaults when the file is absent."""
        path = Path(model_dir) / PREPROCESSOR_CONFIG_FILE
        return cls.from_json_file(path) if path.is_file() else cls()


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """An image as a `uint8[H, W, 3]` array, converted to RGB the way HF converts it.

    PIL images with an alpha band or a transparency entry (RGBA, LA, palette with transparency)
    are alpha-composited onto white; other modes go through `Image.convert("RGB")`. Numpy inputs
    must be uint8, `[H, W]` or `[H, W, C]` with C in {1, 3, 4}; 4 channels are composited onto
    white as HF does for arrays (float64 blend, rounded half to even).
    """
    if isinstance(image, Image.Image):
        if image.mode == "RGB":
            return np.asarray(image)
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8 [H, W, C], got dtype {image.dtype}")
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise ValueError(
                f"numpy images must be [H, W] or [H, W, C] with C in (1, 3, 4), got {image.shape}"
            )
        channels = image.shape[-1]
        if channels == 1:
            return np.repeat(image, 3, axis=-1)
        if channels == 4:
            alpha = image[..., 3:4] / 255
            blended = alpha * image[..., :3] + (1 - alpha) * 255
            return np.round(blended).astype(np.uint8)
        return image
    raise TypeError(f"images must be PIL images or uint8 numpy arrays, got {type(image).__name__}")


def _image_size(image: ImageLike) -> tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, np.ndarray) and image.ndim >= 2:
        return int(image.shape[0]), int(image.shape[1])
    raise TypeError(f"images must be PIL images or uint8 numpy arrays, got {type(image).__name__}")


class ImageProcessor:
    """Turns images into Qwen2.5-VL's `pixel_values` and `image_grid_thw`.

    Construct from an `ImageProcessorConfig` (or `from_model_dir`) and call on a list of images.
    Thread-safe: holds only immutable state.
    """

    def __init__(
        self, config: ImageProcessorConfig | None = None, num_threads: int | None = None
    ) -> None:
        """Args:
        config: preprocessing settings; Qwen2.5-VL's defaults when None.
        num_threads: worker threads over images; `min(4, os.cpu_count())` when None, 1 = serial.
        """
        self.config = config if config is not None else ImageProcessorConfig()
        self.num_threads = num_threads if num_threads is not None else min(4, os.cpu_count() or 1)
        self._flat_lut = _normalisation_table(self.config)  # [3 * 256] float32

    @classmethod
    def from_model_dir(
        cls, model_dir: str | os.PathLike[str], num_threads: int | None = None
    ) -> ImageProcessor:
        """Build from `model_dir/preprocessor_config.json` (defaults when absent)."""
        return cls(ImageProcessorConfig.from_model_dir(model_dir), num_threads=num_threads)

    @property
    def merge_size(self) -> int:
        """Spatial merge size: `merge_size**2` patches become one LLM token."""
        return self.config.merge_size

    def resized_size(
        self,
        height: int,
        width: int,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> tuple[int, int]:
        """`(height, width)` an image of this size is resized to."""
        cfg = self.config
        if not cfg.do_resize:
            return height, width
        return smart_resize(
            height,
            width,
            factor=cfg.factor,
            min_pixels=cfg.min_pixels if min_pixels is None else min_pixels,
            max_pixels=cfg.max_pixels if max_pixels is None else max_pixels,
        )

    def grid_thw(
        self,
        height: int,
        width: int,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> tuple[int, int, int]:
        """`(t, h, w)` patch grid of an image of this size: `(1, H' / 14, W' / 14)`."""
        h, w = self.resized_size(height, width, min_pixels, max_pixels)
        p = self.config.patch_size
        return 1, h // p, w // p

    def num_image_tokens(
        self,
        height: int,
        width: int,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> int:
        """LLM placeholder tokens for an image of this size: patches / merge_size**2."""
        t, h, w = self.grid_thw(height, width, min_pixels, max_pixels)
        return t * h * w // self.config.merge_size**2

    def __call__(
        self,
        images: Sequence[ImageLike] | ImageLike,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Preprocess images.

        Args:
            images: PIL images (any mode) or uint8 `[H, W, C]` arrays, or a single one.
            min_pixels, max_pixels: override the config's pixel bounds for this call.

        Returns:
            pixel_values: float32[P, 1176], all images' patches concatenated in order.
            image_grid_thw: int64[n_images, 3], each image's `(1, H' / 14, W' / 14)`.
        """
        if isinstance(images, (Image.Image, np.ndarray)):
            images = [images]
        images = list(images)
        cfg = self.config
        if not images:
            return (
                np.zeros((0, cfg.patch_dim), np.float32),
                np.zeros((0, 3), np.int64),
            )
        targets = []
        for image in images:
            height, width = _image_size(image)
            h, w = self.resized_size(height, width, min_pixels, max_pixels)
            if h % cfg.factor or w % cfg.factor:
                raise ValueError(
                    f"with do_resize=False image sides must be multiples of {cfg.factor}, "
                    f"got {height}x{width}"
                )
            targets.append((h, w))
        p = cfg.patch_size
        grids = np.array([(1, h // p, w // p) for h, w in targets], dtype=np.int64)  # [n, 3]
        counts = grids.prod(axis=1)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        pixel_values = np.empty((int(offsets[-1]), cfg.patch_dim), np.float32)  # [P, 1176]

        def work(i: int) -> None:
            rgb = to_rgb_array(images[i])
            h, w = targets[i]
            if (rgb.shape[0], rgb.shape[1]) != (h, w):
                resized = Image.fromarray(rgb).resize((w, h), resample=cfg.resample)
                rgb = np.asarray(resized)
            self._patchify_into(rgb, pixel_values[offsets[i] : offsets[i + 1]])

        if self.num_threads > 1 and len(images) > 1:
            with ThreadPoolExecutor(max_workers=min(self.num_threads, len(images))) as pool:
                for future in [pool.submit(work, i) for i in range(len(images))]:
                    future.result()
        else:
            for i in range(len(images)):
                work(i)
        return pixel_values, grids

    def _patchify_into(self, rgb: np.ndarray, out: np.ndarray) -> None:
        """Normalise `rgb` (uint8[H, W, 3]) and write its patches, in HF's order, into `out`."""
        cfg = self.config
        p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
        H, W, C = rgb.shape
        gh, gw = H // p, W // p
        blocks = rgb.reshape(gh // m, m, p, gw // m, m, p, C)  # [gh/m, m, p, gw/m, m, p, C]
        # -> [gh/m, gw/m, m, m, C, p, p], flattened to one row of C*p*p bytes per patch.
        ordered = np.ascontiguousarray(blocks.transpose(0, 3, 1, 4, 6, 2, 5))
        ordered = ordered.reshape(gh * gw, C, p * p)  # [P, C, p*p] uint8
        index = ordered + _CHANNEL_OFFSETS  # [P, C, p*p] uint16: channel c reads lut[c * 256 + v]
        values = self._flat_lut.take(index, mode="clip")  # [P, C, p*p] float32
        frames = out.reshape(gh * gw, C, t, p * p)  # [P, C, T, p*p]
        for k in range(t):
            frames[:, :, k] = values


_CHANNEL_OFFSETS = np.array([[0], [256], [512]], dtype=np.uint16)  # [C, 1]


def _normalisation_table(config: ImageProcessorConfig) -> np.ndarray:
    """`float32[3 * 256]`: the normalised value of each uint8 level, per channel.

    Replays HF's arithmetic exactly: rescale in float64 then cast to float32, then
    `(x - mean) / std` in float32.
    """
    levels = np.arange(256, dtype=np.float64)  # [256]
    x = (levels * config.rescale_factor if config.do_rescale else levels).astype(np.float32)
    if config.do_normalize:
        mean = np.asarray(config.image_mean, dtype=np.float32)[:, None]  # [C, 1]
        std = np.asarray(config.image_std, dtype=np.float32)[:, None]
        table = (x[None, :] - mean) / std  # [C, 256]
    else:
        table = np.broadcast_to(x[None, :], (3, 256))
    return np.ascontiguousarray(table, dtype=np.float32).reshape(-1)


def preprocess_images(
    images: Sequence[ImageLike] | ImageLike,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    config: ImageProcessorConfig | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Preprocess images for Qwen2.5-VL, matching HF's image processor.

    Args:
        images: PIL images (any mode: greyscale, RGBA, palette... are converted to RGB as HF
            does) or uint8 `[H, W, C]` arrays, or a single one.
        min_pixels, max_pixels: pixel bounds for `smart_resize`; the config's when None.
        config: preprocessing settings (e.g. from `ImageProcessorConfig.from_model_dir`);
            Qwen2.5-VL's defaults when None.

    Returns:
        pixel_values: float32[P, 1176] (P = sum of each image's h * w patches).
        image_grid_thw: int64[n_images, 3], rows `(1, h, w)` in patches of 14 pixels.
    """
    return ImageProcessor(config)(images, min_pixels=min_pixels, max_pixels=max_pixels)
