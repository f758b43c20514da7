"""`shapes`: a procedurally drawn world of coloured shapes that needs no download.

The default environment of `vlmgym-train` and of the learning tests: a tiny, randomly
initialised model with a word-level tokenizer must hit a rewarded answer by chance and
learn from it in minutes on a CPU. Hence:

- small images (56x56 by default), drawn with Pillow, deterministic per (seed, idx);
- every answer is ONE word from the fixed vocabulary `ANSWER_VOCAB` (20 words; give each one
  token in a tiny tokenizer), whatever the configuration;
- question kinds (`KINDS`): "color" (what colour is the shape), "shape" (which shape),
  "count" (how many shapes), "position" (left/right or top/bottom), "pair" (two images:
  which one holds a given shape);
- the default (preset "easy") asks only the colour of a single large shape (grid=1: it fills
  its one cell) among 4 colours, so a
  model can learn by associating image colours with the colour word.

Reward (defaults; `format_reward` and `correct_reward` are configurable):

    reward = 0.1 * [the whole answer is exactly one vocabulary word]
           + 0.9 * [the answer read is the correct word]

"Red", " red. " and "**red**" are exact; "I think it is red" is read as red but not exact
(0.9 when correct); an answer naming two vocabulary words reads as nothing (0). So a correct
exact answer earns 1.0, a wrong exact one 0.1.

Chance level: a policy answering one uniformly random word of `ANSWER_VOCAB` earns
0.1 + 0.9 / 20 = 0.145 on average; one answering uniformly among the question kind's own
answers (4 colours in "easy") earns 0.1 + 0.9 / 4 = 0.325 on "easy".
`ShapesEnv.chance_reward()` computes both for any configuration.

Multi-turn (`max_turns > 1`): a wrong answer with turns left returns reward 0, done=False
and a "Wrong, try again" message; a later correct answer earns its reward times
`retry_discount ** turn`.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vlmgym_envs.answers import parse_word
from vlmgym_envs.core import Env, Observation, StepResult, system_message, user_message

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 50, 180),
    "orange": (245, 135, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
NUMBERS: tuple[str, ...] = ("one", "two", "three", "four", "five")
SIDES: tuple[str, ...] = ("left", "right", "top", "bottom")
ORDINALS: tuple[str, ...] = ("first", "second")
KINDS: tuple[str, ...] = ("color", "shape", "count", "position", "pair")

ANSWER_VOCAB: tuple[str, ...] = (*COLORS, *SHAPES, *NUMBERS, *SIDES, *ORDINALS)
"""Every answer word of every configuration (20 lower-case words, fixed order)."""

BACKGROUND = (240, 240, 240)
GRID = 3  # default grid: shapes sit in distinct cells of a grid x grid layout, never overlapping


def answer_vocabulary() -> tuple[str, ...]:
    """The full answer vocabulary, `ANSWER_VOCAB` (for building a tiny tokenizer)."""
    return ANSWER_VOCAB


@dataclass(frozen=True)
class ShapesConfig:
    """Configuration of the shapes world.

    kinds: question kinds to draw from (uniformly), a subset of `KINDS`.
    colors, shapes: the colours and shapes used in images (subsets of `COLORS`, `SHAPES`).
    min_shapes, max_shapes: shapes per image, 1..5 ("pair" and "position" use at least 1;
        "color"/"shape" questions with several shapes name the target by its other attribute).
    image_size: side of the square images, in pixels (>= 28).
    size: `len(env)`, the number of distinct episodes.
    seed: the world's seed; episode idx is a pure function of (seed, idx).
    list_options: name the possible answers in the prompt.
    format_reward, correct_reward: see the module docstring.
    max_turns, retry_discount: multi-turn retries, see the module docstring.
    system_prompt: an optional system message.
    """

    kinds: tuple[str, ...] = ("color",)
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow")
    shapes: tuple[str, ...] = SHAPES
    min_shapes: int = 1
    max_shapes: int = 1
    image_size: int = 56
    grid: int | None = None  # cells per side; None: 1 for single-shape worlds, else GRID
    size: int = 10_000
    seed: int = 0
    list_options: bool = True
    format_reward: float = 0.1
    correct_reward: float = 0.9
    max_turns: int = 1
    retry_discount: float = 0.5
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        for name, values, allowed in (
            ("kinds", self.kinds, KINDS),
            ("colors", self.colors, tuple(COLORS)),
            ("shapes", self.shapes, SHAPES),
        ):
            if not values or len(set(values)) != len(values):
                raise ValueError(f"{name} must be non-empty and distinct, got {values!r}")
            unknown = [v for v in values if v not in allowed]
            if unknown:
                raise ValueError(f"unknown {name} {unknown}; allowed: {allowed}")
        if not 1 <= self.min_shapes <= self.max_shapes <= len(NUMBERS):
            raise ValueError(
                f"need 1 <= min_shapes <= max_shapes <= {len(NUMBERS)}, "
                f"got {self.min_shapes}, {self.max_shapes}"
            )
        if len(self.colors) * len(self.shapes) < 2 and (
            "pair" in self.kinds or self.max_shapes > 1
        ):
            raise ValueError("pair questions and several shapes need >= 2 colour-shape combos")
        if self.max_shapes > 1 and ("color" in self.kinds and len(self.shapes) < 2):
            raise ValueError("colour questions with several shapes need >= 2 shapes")
        if self.max_shapes > 1 and ("shape" in self.kinds and len(self.colors) < 2):
            raise ValueError("shape questions with several shapes need >= 2 colours")
        if self.cells_per_side < 1 or self.max_shapes > self.cells_per_side**2:
            raise ValueError(
                f"grid={self.cells_per_side} has {self.cells_per_side**2} cells, fewer than "
                f"max_shapes={self.max_shapes}"
            )
        if "position" in self.kinds and self.cells_per_side < 2:
            raise ValueError("position questions need grid >= 2")
        if self.image_size < 28:
            raise ValueError(f"image_size must be >= 28, got {self.image_size}")
        if self.size < 1 or self.seed < 0:
            raise ValueError(f"size must be >= 1 and seed >= 0, got {self.size}, {self.seed}")
        if self.max_turns < 1 or not 0.0 <= self.retry_discount <= 1.0:
            raise ValueError("max_turns must be >= 1 and retry_discount in [0, 1]")
        if self.format_reward < 0 or self.correct_reward < 0:
            raise ValueError("rewards must be non-negative")

    @property
    def cells_per_side(self) -> int:
        """The grid actually used: `grid`, or 1 when every scene has one shape and no
        question asks for a position (the shape then fills the image), else GRID."""
        if self.grid is not None:
            return self.grid
        single = self.max_shapes == 1 and "position" not in self.kinds
        return 1 if single else GRID

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ShapesConfig:
        """A named difficulty: "easy" (the default), "medium" or "hard", with overrides."""
        presets: dict[str, dict[str, Any]] = {
            "easy": {},
            "medium": {
                "kinds": ("color", "shape", "count", "position"),
                "colors": tuple(COLORS),
                "max_shapes": 3,
            },
            "hard": {
                "kinds": KINDS,
                "colors": tuple(COLORS),
                "max_shapes": 5,
                "image_size": 112,
            },
        }
        if name not in presets:
            raise ValueError(f"unknown shapes preset {name!r}; known: {sorted(presets)}")
        return cls(**{**presets[name], **overrides})

    def answers(self, kind: str) -> tuple[str, ...]:
        """The words that can be correct for questions of `kind` under this config."""
        return {
            "color": self.colors,
            "shape": self.shapes,
            "count": NUMBERS[self.min_shapes - 1 : self.max_shapes],
            "position": SIDES,
            "pair": ORDINALS,
        }[kind]


@dataclass(frozen=True)
class ShapesState:
    """One episode: its question kind, correct answer and turn (0-based)."""

    idx: int
    kind: str
    question: str
    target: str
    turn: int = 0


@dataclass(frozen=True)
class _Item:
    color: str
    shape: str
    cell: tuple[int, int]  # (row, column)


class ShapesEnv(Env[ShapesState]):
    """The built-in shapes world (see the module docstring).

    `ShapesEnv()` is the easy preset; `ShapesEnv(preset="medium", size=500)` or
    `ShapesEnv(config=ShapesConfig(...))` configure it.
    """

    def __init__(
        self, config: ShapesConfig | None = None, *, preset: str = "easy", **overrides: Any
    ) -> None:
        if config is not None:
            self.config = dataclasses.replace(config, **overrides) if overrides else config
        else:
            self.config = ShapesConfig.preset(preset, **overrides)

    def __len__(self) -> int:
        return self.config.size

    # Episodes -------------------------------------------------------------------------

    def reset(self, idx: int) -> tuple[ShapesState, Observation]:
        idx = self.check_index(idx)
        state, images = self.episode(idx)
        prompt = state.question + " Answer with one word."
        if self.config.list_options:
            prompt += " Options: " + ", ".join(self.config.answers(state.kind)) + "."
        messages = [user_message(prompt, images)]
        if self.config.system_prompt:
            messages.insert(0, system_message(self.config.system_prompt))
        return state, Observation(messages)

    def episode(self, idx: int) -> tuple[ShapesState, list[Image.Image]]:
        """The state and images of episode `idx`: a pure function of (config, idx)."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, idx])
        kind = cfg.kinds[int(rng.integers(len(cfg.kinds)))]
        if kind == "pair":
            question, target, scenes = self._pair(rng)
        else:
            question, target, scene = getattr(self, f"_{kind}")(rng)
            scenes = [scene]
        images = [self.draw(scene, rng) for scene in scenes]
        return ShapesState(idx=idx, kind=kind, question=question, target=target), images

    def _n_shapes(self, rng: np.random.Generator, low: int | None = None) -> int:
        lo = max(self.config.min_shapes, low or 1)
        return int(rng.integers(lo, max(lo, self.config.max_shapes) + 1))

    def _pick(self, rng: np.random.Generator, values: tuple[str, ...]) -> str:
        return values[int(rng.integers(len(values)))]

    def _scene(
        self,
        rng: np.random.Generator,
        n: int,
        target: _Item | None = None,
        forbid: tuple[str | None, str | None] | None = None,
    ) -> list[_Item]:
        """`n` items in distinct cells: `target` (if given) plus distractors.

        forbid=(color, shape): distractors never match on the non-None fields, so the target
        stays the only one with that colour / shape / combination.
        """
        side = self.config.cells_per_side
        cells = [(r, c) for r in range(side) for c in range(side)]
        items = [target] if target is not None else []
        free = [cell for cell in cells if target is None or cell != target.cell]
        order = rng.permutation(len(free))
        while len(items) < n:
            color = self._pick(rng, self.config.colors)
            shape = self._pick(rng, self.config.shapes)
            if forbid is not None:
                bad_color, bad_shape = forbid
                if bad_color is not None and bad_shape is not None:
                    if (color, shape) == forbid:
                        continue
                elif color == bad_color or shape == bad_shape:
                    continue
            items.append(_Item(color, shape, free[int(order[len(items) - (target is not None)])]))
        return items

    def _random_cell(self, rng: np.random.Generator) -> tuple[int, int]:
        side = self.config.cells_per_side
        return int(rng.integers(side)), int(rng.integers(side))

    def _color(self, rng: np.random.Generator) -> tuple[str, str, list[_Item]]:
        n = self._n_shapes(rng)
        target = _Item(
            self._pick(rng, self.config.colors),
            self._pick(rng, self.config.shapes),
            self._random_cell(rng),
        )
        if n == 1:
            return "What colour is the shape?", target.color, [target]
        scene = self._scene(rng, n, target, forbid=(None, target.shape))
        return f"What colour is the {target.shape}?", target.color, scene

    def _shape(self, rng: np.random.Generator) -> tuple[str, str, list[_Item]]:
        n = self._n_shapes(rng)
        target = _Item(
            self._pick(rng, self.config.colors),
            self._pick(rng, self.config.shapes),
            self._random_cell(rng),
        )
        if n == 1:
            return "What shape is in the image?", target.shape, [target]
        scene = self._scene(rng, n, target, forbid=(target.color, None))
        return f"What shape is {target.color}?", target.shape, scene

    def _count(self, rng: np.random.Generator) -> tuple[str, str, list[_Item]]:
        n = self._n_shapes(rng)
        return "How many shapes are there?", NUMBERS[n - 1], self._scene(rng, n)

    def _position(self, rng: np.random.Generator) -> tuple[str, str, list[_Item]]:
        n = self._n_shapes(rng)
        side = self._pick(rng, SIDES)
        edge = 0 if side in ("left", "top") else self.config.cells_per_side - 1
        other = int(rng.integers(self.config.cells_per_side))
        cell = (other, edge) if side in ("left", "right") else (edge, other)
        target = _Item(
            self._pick(rng, self.config.colors), self._pick(rng, self.config.shapes), cell
        )
        pair = "left or the right" if side in ("left", "right") else "top or the bottom"
        question = f"Is the {target.color} {target.shape} on the {pair}?"
        scene = self._scene(rng, n, target, forbid=(target.color, target.shape))
        return question, side, scene

    def _pair(self, rng: np.random.Generator) -> tuple[str, str, list[list[_Item]]]:
        color = self._pick(rng, self.config.colors)
        shape = self._pick(rng, self.config.shapes)
        which = int(rng.integers(2))
        scenes: list[list[_Item]] = []
        for i in range(2):
            n = self._n_shapes(rng)
            target = _Item(color, shape, self._random_cell(rng)) if i == which else None
            scenes.append(self._scene(rng, n, target, forbid=(color, shape)))
        return (
            f"Which image has a {color} {shape}: the first or the second?",
            ORDINALS[which],
            scenes,
        )

    def draw(self, scene: list[_Item], rng: np.random.Generator) -> Image.Image:
        """Render a scene: each item inside its grid cell, size and offset jittered by `rng`."""
        size = self.config.image_size
        image = Image.new("RGB", (size, size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        cell = size / self.config.cells_per_side
        for item in scene:
            radius = cell * float(rng.uniform(0.3, 0.45))
            slack = max(cell / 2 - radius - 1.5, 0.0)  # keep a gap between cells
            cx = (item.cell[1] + 0.5) * cell + float(rng.uniform(-slack, slack))
            cy = (item.cell[0] + 0.5) * cell + float(rng.uniform(-slack, slack))
            box = (cx - radius, cy - radius, cx + radius, cy + radius)
            fill = COLORS[item.color]
            if item.shape == "circle":
                draw.ellipse(box, fill=fill)
            elif item.shape == "square":
                draw.rectangle(box, fill=fill)
            else:
                draw.polygon(
                    [(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)],
                    fill=fill,
                )
        return image

    # Scoring --------------------------------------------------------------------------

    def score(self, state: ShapesState, text: str) -> tuple[float, dict[str, Any]]:
        """The reward of one answer and its info, ignoring turns (see the module docstring)."""
        cfg = self.config
        parsed = parse_word(text, ANSWER_VOCAB)
        correct = parsed.word == state.target
        reward = cfg.format_reward * parsed.exact + cfg.correct_reward * correct
        info: dict[str, Any] = {
            "kind": state.kind,
            "target": state.target,
            "answer": parsed.word,
            "format_ok": parsed.exact,
            "correct": correct,
            "turn": state.turn,
        }
        if parsed.reason:
            info["parse_error"] = parsed.reason
        return float(reward), info

    def metrics(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """accuracy overall and per question kind (`accuracy/<kind>`), and `format_ok`."""
        by_kind: dict[str, list[bool]] = defaultdict(list)
        for r in records:
            by_kind[str(r["info"].get("kind"))].append(bool(r["info"].get("correct")))
        out = {f"accuracy/{k}": float(np.mean(v)) for k, v in sorted(by_kind.items())}
        out["accuracy"] = float(np.mean([c for v in by_kind.values() for c in v]))
        out["format_ok"] = float(np.mean([bool(r["info"].get("format_ok")) for r in records]))
        return out

    def step(self, state: ShapesState, text: str) -> StepResult[ShapesState]:
        reward, info = self.score(state, text)
        last_turn = state.turn + 1 >= self.config.max_turns
        if info["correct"] or last_turn:
            reward *= self.config.retry_discount**state.turn
            return StepResult(reward=reward, done=True, info=info)
        retry = "Wrong, try again. Answer with one word."
        return StepResult(
            reward=0.0,
            done=False,
            info=info,
            observation=Observation([user_message(retry)]),
            state=dataclasses.replace(state, turn=state.turn + 1),
        )

    def chance_reward(self) -> dict[str, float]:
        """Expected single-turn reward of two random policies, averaged over question kinds.

        uniform_vocab: one uniformly random word of `ANSWER_VOCAB`, always exact.
        uniform_kind: one uniformly random word among the question kind's answers.
        """
        cfg = self.config
        vocab = cfg.format_reward + cfg.correct_reward / len(ANSWER_VOCAB)
        kind = float(
            np.mean(
                [cfg.format_reward + cfg.correct_reward / len(cfg.answers(k)) for k in cfg.kinds]
            )
        )
        return {"uniform_vocab": vocab, "uniform_kind": kind}
