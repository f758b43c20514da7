"""The `zoom` tool: a region of the episode's image at full resolution.

    zoom(x0, y0, x1, y1)   coordinates are FRACTIONS of the width and height, 0 to 1,
                           (x0, y0) the top-left corner, (x1, y1) the bottom-right one

The region is cut from the image the tools read (`ToolContext.images`: full resolution;
`ToolEnv(first_view_side=...)` shows the model a downscaled copy first). The crop keeps its
pixels: it is never downscaled unless longer than `max_side`; one shorter than `min_side`
(vision processors' minimum) is enlarged by an integer factor, nearest neighbour, so no
detail is invented. Regions of an aspect ratio beyond `MAX_ASPECT` are refused (vision
processors reject them).
"""

from __future__ import annotations

import math
from typing import Any

from PIL import Image

from vlmgym_envs.tools import Tool, ToolArgumentError, ToolContext

MAX_ASPECT = 20.0
ZOOM_DESCRIPTION = (
    "Zoom into a region of the image: returns that region at full resolution. Coordinates "
    "are fractions of the image width and height, from 0 to 1: (x0, y0) is the region's "
    "top-left corner and (x1, y1) its bottom-right corner."
)


def _coordinate(description: str) -> dict[str, Any]:
    return {"type": "number", "minimum": 0, "maximum": 1, "description": description}


ZOOM_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "x0": _coordinate("left edge, fraction of the width"),
        "y0": _coordinate("top edge, fraction of the height"),
        "x1": _coordinate("right edge, fraction of the width"),
        "y1": _coordinate("bottom edge, fraction of the height"),
    },
    "required": ["x0", "y0", "x1", "y1"],
    "additionalProperties": False,
}


def downscale(image: Image.Image, side: int) -> Image.Image:
    """`image` shrunk (box filter: each pixel the mean of the pixels it covers) so its longer
    side is at most `side`; returned unchanged when it already fits."""
    w, h = image.size
    if max(w, h) <= side:
        return image
    scale = side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(size, Image.Resampling.BOX)


def crop_region(
    image: Image.Image,
    x0: float,
    y0: float,
    x1: float,
    y1: float,
    *,
    min_side: int = 28,
    max_side: int | None = None,
) -> Image.Image:
    """The region (fractions of the size, see the module docstring) of `image`.

    Raises:
      ToolArgumentError: an empty or inverted region, or one too thin.
    """
    if not (x0 < x1 and y0 < y1):
        raise ToolArgumentError("need x0 < x1 and y0 < y1")
    w, h = image.size
    left, top = min(math.floor(x0 * w), w - 1), min(math.floor(y0 * h), h - 1)
    right, bottom = max(math.ceil(x1 * w), left + 1), max(math.ceil(y1 * h), top + 1)
    cw, ch = right - left, bottom - top
    if max(cw, ch) / min(cw, ch) > MAX_ASPECT:
        raise ToolArgumentError(f"the region is {cw}x{ch} pixels; keep its sides within 1:20")
    region = image.crop((left, top, right, bottom))
    if min(cw, ch) < min_side:
        factor = math.ceil(min_side / min(cw, ch))
        region = region.resize((cw * factor, ch * factor), Image.Resampling.NEAREST)
    if max_side is not None:
        region = downscale(region, max_side)
    return region


def zoom_tool(*, min_side: int = 28, max_side: int | None = None, image_index: int = 0) -> Tool:
    """The `zoom(x0, y0, x1, y1)` tool on the episode's image number `image_index`."""

    def zoom(x0: float, y0: float, x1: float, y1: float, context: ToolContext) -> Image.Image:
        if not -len(context.images) <= image_index < len(context.images):
            raise ValueError(f"the episode has no image {image_index}")
        image = context.images[image_index]
        return crop_region(image, x0, y0, x1, y1, min_side=min_side, max_side=max_side)

    return Tool(
        name="zoom",
        description=ZOOM_DESCRIPTION,
        parameters=ZOOM_PARAMETERS,
        fn=zoom,
        takes_context=True,
    )
