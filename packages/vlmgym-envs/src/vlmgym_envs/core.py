"""The environment API: `Env`, `Observation`, `StepResult`.

An environment shows the model chat messages (text and PIL images) and scores the text the
model writes back:

    state, obs = env.reset(idx)          # obs.messages: HF chat messages with PIL images
    result = env.step(state, text)       # StepResult(reward, done, info, observation)

Contract every environment keeps:

- `step` reads text, never token ids, and never raises on model output: empty text, 20,000
  characters, unicode, control characters or prompt-injection-like strings score (usually
  zero) and `info` says why.
- States are immutable values. Stepping the same state several times (one prompt, a group
  of G sampled completions, as GRPO does) is allowed and gives independent results.
- Multi-turn: `step` may return `done=False` with `observation` and `state` set; the
  observation's messages are the ones to append to the conversation after the model's
  reply, and the next `step` takes `StepResult.state`.
- Bad data: `reset(idx)` raises `SkipTask` (a `DataError` with a short `reason` such as
  "corrupt_image", and a message naming the item) when task `idx` cannot be shown: a
  corrupt, truncated or oversized image, a missing file. The caller takes another task; a
  `reset` that raised changes nothing else. Any other exception is a bug or a dataset that
  cannot be used at all. `skipped()` counts, per reason, everything the env left out so
  far: rows dropped while loading its table and tasks whose `reset` raised `SkipTask`.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path
from typing import Any, Generic, TypeVar

from PIL import Image

Message = dict[str, Any]
"""One HF chat message: `{"role": "user", "content": [{"type": "image", "image": PIL}, ...]}`."""

StateT = TypeVar("StateT")


@dataclass(frozen=True)
class Observation:
    """What the model sees: chat messages in the HF processor format.

    `messages` is a plain list of dicts, e.g.
    `[{"role": "user", "content": [{"type": "image", "image": <PIL.Image>},
    {"type": "text", "text": "..."}]}]`, optionally led by a system message, so a model-side
    processor can render it with its chat template unchanged.
    """

    messages: list[Message]

    @property
    def images(self) -> list[Image.Image]:
        """The images of every message, in order of appearance."""
        return [
            part["image"]
            for message in self.messages
            for part in _parts(message)
            if part.get("type") == "image"
        ]

    @property
    def text(self) -> str:
        """The text parts of every message joined by newlines (for logging and debugging)."""
        return "\n".join(
            part["text"]
            for message in self.messages
            for part in _parts(message)
            if part.get("type") == "text"
        )


def _parts(message: Message) -> list[dict[str, Any]]:
    content = message.get("content", [])
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content)


def user_message(text: str, images: Sequence[Image.Image] = ()) -> Message:
    """One user message holding `images` (first, in order) and then `text`."""
    content: list[dict[str, Any]] = [{"type": "image", "image": image} for image in images]
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def system_message(text: str) -> Message:
    """One system message."""
    return {"role": "system", "content": [{"type": "text", "text": text}]}


@dataclass(frozen=True)
class StepResult(Generic[StateT]):
    """The outcome of one `Env.step`.

    reward: the scalar reward of this step (a float, finite).
    done: True when the episode is over. When False, `observation` holds the messages to
        append after the model's reply and `state` the state to pass to the next `step`.
    info: per-field diagnostics (parsed answer, per-level correctness, parse errors...). Its
        values are plain Python scalars, strings, lists and dicts (JSON-serialisable).
    """

    reward: float
    done: bool
    info: dict[str, Any] = field(default_factory=dict)
    observation: Observation | None = None
    state: StateT | None = None


class Env(abc.ABC, Generic[StateT]):
    """Base class of every environment.

    Subclasses implement `__len__`, `reset` and `step`. The batch helpers `reset_many` and
    `step_many` loop over them; override them when a batched implementation is faster.
    """

    @abc.abstractmethod
    def __len__(self) -> int:
        """The number of distinct episodes (`reset` accepts `0 <= idx < len(env)`)."""

    @abc.abstractmethod
    def reset(self, idx: int) -> tuple[StateT, Observation]:
        """Start episode `idx`; return its state and first observation."""

    @abc.abstractmethod
    def step(self, state: StateT, text: str) -> StepResult[StateT]:
        """Score the model's `text` for `state`. Never raises on `text`."""

    def reset_many(self, indices: Iterable[int]) -> list[tuple[StateT, Observation]]:
        """`reset` each index, in order."""
        return [self.reset(int(idx)) for idx in indices]

    def step_many(self, states: Sequence[StateT], texts: Sequence[str]) -> list[StepResult[StateT]]:
        """`step` each (state, text) pair, in order. The two sequences must have equal length."""
        if len(states) != len(texts):
            raise ValueError(f"step_many got {len(states)} states but {len(texts)} texts")
        return [self.step(state, text) for state, text in zip(states, texts, strict=True)]

    def metrics(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """The task's own metrics over evaluation records (none by default).

        One record per task (its first sample), as `vlmgym-eval` writes them to
        `records.jsonl`: "reward", "completion", "parsed", and "info" (the `StepResult`'s
        info) and "state" (the episode state) as JSON values (dataclasses become dicts).
        """
        return {}

    def step_metrics(self, infos: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """The task's own metrics over one training step's episodes (none by default).

        `infos` holds the final `StepResult.info` of every trajectory the step trained on.
        The trainer logs the result under `env/` beside the plain means of the info's
        numbers, in `metrics.jsonl` and W&B; use this for what a mean cannot say
        (quantiles, shares within thresholds). Never raises on odd infos.
        """
        return {}

    def skipped(self) -> dict[str, int]:
        """reason -> count of what this env left out so far, cumulative: rows dropped while
        loading its data and tasks whose `reset` raised `SkipTask` (see the module
        docstring). Empty by default; `data.errors.SkipCounts` keeps such counts."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What the env learns while a run goes on (a curriculum's progress), as JSON; the
        trainer saves it with every checkpoint and hands it to `load_state_dict` on
        `--resume`. Empty by default (an env that only reads its dataset)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        del state

    def plots(self, records: Sequence[Mapping[str, Any]], out_dir: Path) -> list[Path]:
        """Draw the task's own plots of evaluation records (as for `metrics`) into `out_dir`
        and return their paths. None by default; the evaluator then draws a reward histogram.
        """
        return []

    def check_index(self, idx: int) -> int:
        """Validate an episode index (negative indices count from the end, like a list)."""
        n = len(self)
        if not isinstance(idx, int | Integral):
            raise TypeError(f"episode index must be an int, got {type(idx).__name__}")
        i = int(idx)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"episode index {idx} out of range for an environment of {n}")
        return i


def as_text(text: object) -> str:
    """Model output as a `str`, whatever was passed (bytes decoded leniently, None -> "")."""
    if isinstance(text, str):
        return text
    if text is None:
        return ""
    if isinstance(text, bytes | bytearray):
        return bytes(text).decode("utf-8", errors="replace")
    return str(text)
