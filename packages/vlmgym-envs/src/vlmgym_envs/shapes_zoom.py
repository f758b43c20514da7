"""`shapes_zoom`: the shapes world with a detail too small to read until the model zooms.

The image (224 x 224 by default) is light grey with one small square "mark" somewhere in
one of its four quadrants. The mark is a tiling of dots: every block of `block` x `block`
pixels (block = image_size / view_size, 8 by default) holds a centred dot of side block/2 in
the answer colour on a ground colour chosen so that the block's mean is the same grey
(126, 126, 126) for every answer. The model first sees the image downscaled to `view_size`
(28 px) with a box filter, so each block becomes one pixel of exactly that grey: the mark
shows as a grey square whose colour cannot be read, and the first view is pixel-identical
for every answer colour (given the mark's place). The `zoom(x0, y0, x1, y1)` tool
(`zoom.zoom_tool`, coordinates as fractions of the size) returns the region at full
resolution, where the dots are plain to see.

Question: "What colour are the dots on the small grey square?", options red, green, blue,
yellow (words of `shapes.ANSWER_VOCAB`). Reward as `shapes`: 0.1 for an answer that is
exactly one vocabulary word + 0.9 when it is the right colour, minus `call_cost` per call.
A direct answer scores chance at best: 0.1 + 0.9 / 4 = 0.325 (`chance_reward`).

For tiny word-level models, `tool_phrases()` lists five complete calls (the whole image and
each quadrant, in Qwen's exact `<tool_call>` format) that such a tokenizer gives one token
each, as it gives each answer word one token: a random policy then calls zoom as often as it
says any other word. With `quadrant_phrases=False` it lists only the whole-image call.

The final step's info adds `saw_mark` (1.0 when a zoom returned a region holding the whole
mark), so a run shows whether its zooms look in the right place.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from vlmgym_envs.core import StepResult
from vlmgym_envs.shapes import ANSWER_VOCAB, ShapesConfig, ShapesEnv, ShapesState
from vlmgym_envs.tool_env import DEFAULT_SYSTEM, ToolEnv, ToolState
from vlmgym_envs.tools import ToolCall, format_tool_call, parse_tool_calls
from vlmgym_envs.zoom import zoom_tool

# Dot colours (multiples of 3, so the ground colour (4 * GREY - dot) / 3 is an integer and
# every block's mean is exactly GREY).
DOT_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (219, 39, 39),
    "green": (39, 168, 60),
    "blue": (39, 81, 219),
    "yellow": (234, 204, 30),
}
GREY = 126
BACKGROUND = (235, 235, 235)
QUESTION = (
    "What colour are the dots on the small grey square? They are too small to see here: "
    "zoom in to read them."
)
# The regions of `tool_phrases`: the whole image, then the quadrants (x0, y0, x1, y1).
PHRASE_REGIONS: tuple[tuple[float, float, float, float], ...] = (
    (0, 0, 1, 1),
    (0, 0, 0.5, 0.5),
    (0.5, 0, 1, 0.5),
    (0, 0.5, 0.5, 1),
    (0.5, 0.5, 1, 1),
)


def ground_color(dot: tuple[int, int, int]) -> tuple[int, int, int]:
    """The ground colour that makes a block (1/4 dot, 3/4 ground) average to GREY."""
    r, g, b = ((4 * GREY - c) // 3 for c in dot)
    return (r, g, b)


def zoom_phrases(*, quadrants: bool = True) -> tuple[str, ...]:
    """The whole-image and (with `quadrants`) quadrant zoom calls, each exactly as Qwen
    writes a call."""
    regions = PHRASE_REGIONS if quadrants else PHRASE_REGIONS[:1]
    return tuple(
        format_tool_call("zoom", {"x0": x0, "y0": y0, "x1": x1, "y1": y1})
        for x0, y0, x1, y1 in regions
    )


def answer_vocabulary() -> tuple[str, ...]:
    """The answer words (`shapes.ANSWER_VOCAB`), for building a tiny tokenizer."""
    return ANSWER_VOCAB


@dataclass(frozen=True)
class MarkState(ShapesState):
    """A shapes episode plus where the mark is: its quadrant (0 top-left, 1 top-right,
    2 bottom-left, 3 bottom-right) and its top-left pixel; `saw_mark`: a zoom call so far
    returned a region holding the whole mark."""

    quadrant: int = 0
    mark_xy: tuple[int, int] = (0, 0)
    saw_mark: bool = False


class ShapesMarkEnv(ShapesEnv):
    """The single-turn task under `shapes_zoom`: the full-resolution image and the question,
    scored like `shapes` (see the module docstring).

    image_size: side of the full-resolution image; view_size: side of the first view (the
    block is image_size // view_size, even); mark_blocks: the mark's side in blocks.
    """

    def __init__(
        self,
        *,
        image_size: int = 224,
        view_size: int = 28,
        mark_blocks: int = 6,
        **overrides: Any,
    ) -> None:
        block = image_size // view_size if view_size > 0 else 0
        if view_size < 4 or view_size % 2 or image_size % view_size or block < 2 or block % 2:
            raise ValueError(
                "need an even view_size >= 4 dividing image_size into even blocks, got "
                f"image_size={image_size}, view_size={view_size}"
            )
        if not 1 <= mark_blocks <= view_size // 2 - 2:
            raise ValueError(f"mark_blocks must be in [1, {view_size // 2 - 2}]")
        config = ShapesConfig(
            kinds=("color",), colors=tuple(DOT_COLORS), image_size=image_size, **overrides
        )
        super().__init__(config)
        self.view_size = view_size
        self.block = block
        self.mark_blocks = mark_blocks

    def answer_vocabulary(self) -> tuple[str, ...]:
        """The answer words (`shapes.ANSWER_VOCAB`)."""
        return ANSWER_VOCAB

    def episode(self, idx: int) -> tuple[ShapesState, list[Image.Image]]:
        """The state and full-resolution image of episode `idx` (pure in (config, idx))."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, idx])
        color = cfg.colors[int(rng.integers(len(cfg.colors)))]
        quadrant = int(rng.integers(4))
        half = self.view_size // 2  # a quadrant's side, in blocks
        bx = (quadrant % 2) * half + int(rng.integers(1, half - self.mark_blocks))
        by = (quadrant // 2) * half + int(rng.integers(1, half - self.mark_blocks))
        xy = (bx * self.block, by * self.block)
        state = MarkState(
            idx=idx, kind="color", question=QUESTION, target=color, quadrant=quadrant, mark_xy=xy
        )
        return state, [self.draw_mark(color, xy)]

    def draw_mark(self, color: str, xy: tuple[int, int]) -> Image.Image:
        """The image with the mark of dots of `color` whose top-left pixel is `xy`."""
        size, block = self.config.image_size, self.block
        pixels = np.empty((size, size, 3), np.uint8)
        pixels[:] = BACKGROUND
        x, y = xy
        side = self.mark_blocks * block
        pixels[y : y + side, x : x + side] = ground_color(DOT_COLORS[color])
        lo, hi = block // 4, block // 4 + block // 2  # the dot inside each block
        dot = np.zeros((block, block), bool)
        dot[lo:hi, lo:hi] = True
        mask = np.tile(dot, (self.mark_blocks, self.mark_blocks))
        pixels[y : y + side, x : x + side][mask] = DOT_COLORS[color]
        return Image.fromarray(pixels, "RGB")


class ShapesZoomEnv(ToolEnv):
    """`shapes_zoom` (see the module docstring): `ShapesMarkEnv` with the zoom tool, first
    shown at `view_size`.

    max_calls, call_cost, timeout_s, system_prompt: as `ToolEnv`; image_size, view_size,
    mark_blocks: as `ShapesMarkEnv`; zoom_min_side: zoomed regions shorter than this are
    enlarged by an integer factor, nearest neighbour (224 shows a quadrant at 2x, 8 px
    dots: bigger for a tiny vision tower, at 4x the image tokens); quadrant_phrases: list
    the quadrant calls in `tool_phrases` (else only the whole-image call); other keywords
    go to `ShapesConfig` (size, seed, list_options, format_reward, correct_reward).
    """

    def __init__(
        self,
        *,
        image_size: int = 224,
        view_size: int = 28,
        mark_blocks: int = 6,
        zoom_min_side: int = 28,
        quadrant_phrases: bool = True,
        max_calls: int = 2,
        call_cost: float = 0.0,
        timeout_s: float = 10.0,
        system_prompt: str = DEFAULT_SYSTEM,
        **config: Any,
    ) -> None:
        inner = ShapesMarkEnv(
            image_size=image_size, view_size=view_size, mark_blocks=mark_blocks, **config
        )
        super().__init__(
            inner,
            [zoom_tool(min_side=zoom_min_side)],
            max_calls=max_calls,
            timeout_s=timeout_s,
            call_cost=call_cost,
            first_view_side=view_size,
            system_prompt=system_prompt,
            phrases=zoom_phrases(quadrants=quadrant_phrases),
        )
        self.image_size = image_size
        self.mark_side = mark_blocks * inner.block

    def step(self, state: ToolState, text: str) -> StepResult[ToolState]:
        result = super().step(state, text)
        mark = state.inner
        assert isinstance(mark, MarkState)
        if result.done:
            return dataclasses.replace(
                result, info={**result.info, "saw_mark": float(mark.saw_mark)}
            )
        new = result.state
        if new is None or mark.saw_mark or not self._zooms_on_mark(mark, text, result.info):
            return result
        seen = dataclasses.replace(new, inner=dataclasses.replace(mark, saw_mark=True))
        return dataclasses.replace(result, state=seen)

    def _zooms_on_mark(self, mark: MarkState, text: str, info: dict[str, Any]) -> bool:
        """Whether a zoom call of this turn that ran returned a region holding the mark."""
        if "tool_results" not in info:  # not a tool turn
            return False
        x, y = mark.mark_xy
        size, side = self.image_size, self.mark_side
        # `ToolEnv.step` summarises every parsed item, in order
        for item, outcome in zip(parse_tool_calls(text).items, info["tool_results"], strict=True):
            if not isinstance(item, ToolCall) or item.name != "zoom" or outcome["error"]:
                continue
            a = item.arguments  # the pixel box as `zoom.crop_region` cuts it
            left, top = math.floor(a["x0"] * size), math.floor(a["y0"] * size)
            right, bottom = math.ceil(a["x1"] * size), math.ceil(a["y1"] * size)
            if left <= x and x + side <= right and top <= y and y + side <= bottom:
                return True
        return False

    def chance_reward(self) -> dict[str, float]:
        """Expected reward of direct answers: a random vocabulary word, a random colour."""
        return self.env.chance_reward()
