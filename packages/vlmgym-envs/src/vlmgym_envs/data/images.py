"""Bounded image decoding: what one hostile image can cost is capped before it is decoded.

`decode_image(data, what, limits)` turns image bytes into an RGB PIL image, in this order:

1. open lazily (only the header is read) as one of `IMAGE_FORMATS`;
2. refuse a declared size over `max_decoded_pixels` ("image_too_large") or an aspect ratio
   over `max_aspect_ratio` ("bad_aspect_ratio"), before any pixel is decoded;
3. decode at no more than the pixel budget needs: JPEG's DCT scaling (`Image.draft`)
   decodes a 12000x12000 photo at 1/2, 1/4 or 1/8 scale, and every format is reduced to
   `max_image_pixels` (and `max_side`) before it is converted to RGB;
4. anything that is not an image, or is truncated, fails inside this function
   ("corrupt_image"), since the image is loaded here, not later in a processor.

Each refusal raises `SkipTask` with its reason and a message naming `what`. Pillow's own
global limit (`Image.MAX_IMAGE_PIXELS`, which refuses more than twice that) is never
changed here; an image it refuses is "image_too_large" too.

`read_capped` reads a file or stream with a byte cap, so a file or a zip member whose
header lies about its size cannot allocate more than the cap either.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from dataclasses import dataclass
from typing import IO

from PIL import Image

from vlmgym_envs.data.errors import SkipTask

IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
"""The formats decoded (JPEG includes its MPO variant); others (EPS, which runs
Ghostscript, and rarer ones) are refused."""

DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
"""16.8 MP: above Qwen2.5-VL's default `max_pixels` (12845056 = 3584^2), so with the
default processor settings the model sees the same image it would without this cap."""

DEFAULT_MAX_DECODED_PIXELS = 150_000_000
"""150 MP (12247^2): room for the largest camera photos, below Pillow's own refusal (twice
`Image.MAX_IMAGE_PIXELS`, about 179 MP) so that ours decides, with our message."""

DEFAULT_MAX_IMAGE_BYTES = 64 * 2**20
"""64 MiB: a JPEG at the pixel limit above is rarely a tenth of that."""

MAX_ASPECT_RATIO = 200.0
"""Qwen-VL image processors refuse a longer side over 200 times the shorter one."""

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


@dataclass(frozen=True)
class ImageLimits:
    """What one image may cost (see the module docstring).

    max_image_pixels: downscale (keeping the aspect ratio) to at most this many pixels;
        None: no pixel budget.
    max_side: downscale so the longer side is at most this; None: no limit.
    max_decoded_pixels: refuse an image declaring more pixels ("image_too_large").
    max_image_bytes: refuse an image file or zip member larger than this (before reading).
    max_aspect_ratio: refuse a longer side over this many times the shorter one.
    """

    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    max_side: int | None = None
    max_decoded_pixels: int = DEFAULT_MAX_DECODED_PIXELS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_aspect_ratio: float = MAX_ASPECT_RATIO

    def __post_init__(self) -> None:
        for name in ("max_image_pixels", "max_side"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        for name in ("max_decoded_pixels", "max_image_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.max_aspect_ratio >= 1:
            raise ValueError(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """The size `(width, height)` is downscaled to (itself when within the limits)."""
        scale = 1.0
        if self.max_image_pixels is not None and width * height > self.max_image_pixels:
            scale = math.sqrt(self.max_image_pixels / (width * height))
        if self.max_side is not None and max(width, height) > self.max_side:
            scale = min(scale, self.max_side / max(width, height))
        if scale >= 1.0:
            return width, height
        w, h = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
        # Flooring the short side can push the ratio over the limit: round that side up.
        if w >= h and w / h > self.max_aspect_ratio:
            h = math.ceil(w / self.max_aspect_ratio)
        elif h > w and h / w > self.max_aspect_ratio:
            w = math.ceil(h / self.max_aspect_ratio)
        return w, h


def read_capped(stream: IO[bytes], what: str, limit: int, reason: str) -> bytes:
    """At most `limit` bytes of `stream`; `SkipTask(reason)` naming `what` if there are more."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise SkipTask(reason, f"{what} holds more than {limit} bytes (max_image_bytes)")
    return data


def decode_image(data: bytes, what: str, limits: ImageLimits | None = None) -> Image.Image:
    """Decode image bytes to an RGB PIL image within `limits` (see the module docstring).

    Raises `SkipTask` ("corrupt_image", "image_too_large" or "bad_aspect_ratio") naming
    `what` when the image cannot be shown.
    """
    limits = limits or ImageLimits()
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own limit; ours is explicit (max_decoded_pixels).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:
        raise SkipTask("image_too_large", f"image {what} is too large to decode: {e}") from e
    except Image.UnidentifiedImageError as e:
        formats = ", ".join(IMAGE_FORMATS[:-1]) + " or " + IMAGE_FORMATS[-1]
        raise SkipTask("corrupt_image", f"image {what} is corrupt: not {formats}") from e
    except _DECODE_ERRORS as e:
        raise SkipTask("corrupt_image", f"image {what} is corrupt or unreadable: {e}") from e
    return _bounded(image, what, limits)


def _bounded(image: Image.Image, what: str, limits: ImageLimits) -> Image.Image:
    """Check the declared size, then decode (JPEG: scaled in the DCT), shrink, convert."""
    width, height = image.size
    if width < 1 or height < 1:
        raise SkipTask("corrupt_image", f"image {what} declares size {width}x{height}")
    if width * height > limits.max_decoded_pixels:
        raise SkipTask(
            "image_too_large",
            f"image {what} is {width}x{height} = {width * height} pixels, over "
            f"max_decoded_pixels={limits.max_decoded_pixels}",
        )
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        raise SkipTask(
            "bad_aspect_ratio",
            f"image {what} is {width}x{height}: aspect ratio {ratio:.1f} is over "
            f"{limits.max_aspect_ratio:g}",
        )
    target = limits.target_size(width, height)
    try:
        if target != (width, height):
            image.draft("RGB", target)  # JPEG: decode at 1/2, 1/4 or 1/8; others: no-op
        image.load()  # a truncated file fails here, not in a processor later
        if image.mode not in ("RGB", "RGBA", "L", "LA", "CMYK", "YCbCr"):
            image = image.convert("RGB")  # palette, 1-bit, 16-bit: resize needs plain bands
        if image.size != target:
            image = image.resize(target, Image.Resampling.BICUBIC, reducing_gap=2.0)
        return image.convert("RGB") if image.mode != "RGB" else image
    except _DECODE_ERRORS as e:
        raise SkipTask("corrupt_image", f"image {what} is corrupt or unreadable: {e}") from e
