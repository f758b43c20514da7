"""`geoguessr_feedback`: OSV-5M GeoGuessr over several guesses, told how far off each was.

After each guess the env replies how many kilometres the guess is from the true place, in
which compass direction the true place lies, and whether the country is right, and the
model guesses again, up to `max_turns` guesses. The episode ends at the last turn or as soon
as a guess lands within `stop_km` of the truth. Only the final guess is scored: its `osv5m`
reward (same parse, levels, curriculum) times `turn_discount ** turn`, turn counted from 0;
earlier turns earn 0. An answer without readable coordinates is told so (and to use the
format) instead of a distance.

State: `GeoFeedbackState`, the `osv5m` state plus the turn. Info: the `osv5m` info plus
`turn` (0-based) and `turns` (guesses so far); `step_metrics` and `metrics` add
`feedback/turns_per_episode`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vlmgym_envs.core import Observation, StepResult, as_text, user_message
from vlmgym_envs.geoguessr.answer import GEO_ANSWER_FORMAT, GeoGuess, parse_geo_answer
from vlmgym_envs.geoguessr.env import GEO_PROMPT, OSV5MEnv, OSV5MState, level_info
from vlmgym_envs.geoguessr.reward import GeoTruth, LevelScores, score_levels

COMPASS: tuple[str, ...] = (
    "north",
    "north-east",
    "east",
    "south-east",
    "south",
    "south-west",
    "west",
    "north-west",
)
GEO_FEEDBACK_PROMPT = (
    GEO_PROMPT + "\n\nAfter each guess you will be told how far off it was, and you may guess "
    "again."
)


@dataclass(frozen=True)
class GeoFeedbackState(OSV5MState):
    """An `osv5m` episode and its turn (0-based: the guesses made before this one)."""

    turn: int = 0


def bearing_deg(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Initial great-circle bearing from point 1 to point 2, degrees clockwise from north."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dl = math.radians(lon2 - lon1)
    x = math.sin(dl) * math.cos(p2)
    y = math.cos(p1) * math.sin(p2) - math.sin(p1) * math.cos(p2) * math.cos(dl)
    return math.degrees(math.atan2(x, y)) % 360.0


def compass(bearing: float) -> str:
    """The 8-point compass direction of a bearing in degrees."""
    return COMPASS[int(((bearing % 360.0) + 22.5) // 45.0) % 8]


def feedback_text(guess: GeoGuess, truth: GeoTruth, levels: LevelScores) -> str:
    """What the env tells the model about one guess (see the module docstring)."""
    if levels.distance_km is None or not guess.has_coordinates:
        return (
            "I could not read a latitude and longitude in your answer. Guess again, in "
            "exactly this format:\n" + GEO_ANSWER_FORMAT
        )
    lat, lon = float(guess.latitude), float(guess.longitude)  # type: ignore[arg-type]
    direction = compass(bearing_deg(lat, lon, truth.latitude, truth.longitude))
    country = "right" if levels.country else "wrong"
    return (
        f"Your guess is {levels.distance_km:.0f} km from the true location, which lies to "
        f"the {direction} of your guess. The country is {country}. Guess again in the same "
        "format."
    )


class GeoFeedbackEnv(OSV5MEnv):
    """`geoguessr_feedback` (see the module docstring).

    max_turns: guesses allowed (>= 1). turn_discount: the final reward's factor per turn
    used, in [0, 1]. stop_km: a guess this close ends the episode. Other arguments: as
    `OSV5MEnv`.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        split: str = "test",
        *,
        max_turns: int = 3,
        turn_discount: float = 0.8,
        stop_km: float = 25.0,
        prompt: str = GEO_FEEDBACK_PROMPT,
        **kwargs: Any,
    ) -> None:
        if max_turns < 1 or not 0.0 <= turn_discount <= 1.0 or not stop_km >= 0:
            raise ValueError("need max_turns >= 1, turn_discount in [0, 1], stop_km >= 0")
        super().__init__(data_dir, split, prompt=prompt, **kwargs)
        self.max_turns = max_turns
        self.turn_discount = turn_discount
        self.stop_km = stop_km

    def reset(self, idx: int) -> tuple[GeoFeedbackState, Observation]:
        state, obs = super().reset(idx)
        fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
        return GeoFeedbackState(**fields), obs

    def step(self, state: OSV5MState, text: str) -> StepResult[OSV5MState]:
        turn = getattr(state, "turn", 0)
        guess = parse_geo_answer(as_text(text))
        levels = score_levels(guess, state.truth)
        info = level_info(state.stage, guess, levels)
        info["turn"] = turn
        info["turns"] = turn + 1
        close = levels.distance_km is not None and levels.distance_km <= self.stop_km
        if close or turn + 1 >= self.max_turns:
            self.curriculum.record(levels)
            reward = self._score(state, guess, levels, info) * self.turn_discount**turn
            return StepResult(reward=reward, done=True, info=info)
        message = user_message(feedback_text(guess, state.truth, levels))
        next_state = GeoFeedbackState(state.idx, state.id, state.truth, state.stage, turn=turn + 1)
        return StepResult(0.0, False, info, Observation([message]), next_state)

    def metrics(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """`osv5m`'s metrics of the final guesses and `feedback/turns_per_episode`."""
        out = super().metrics(records)
        out.update(_turn_metrics([r.get("info") for r in records]))
        return out

    def step_metrics(self, infos: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """`osv5m`'s step metrics and `feedback/turns_per_episode`."""
        out = super().step_metrics(infos)
        out.update(_turn_metrics(infos))
        return out


def _turn_metrics(infos: Sequence[Mapping[str, Any] | None]) -> dict[str, float]:
    turns = [
        float(i["turns"])
        for i in infos
        if isinstance(i, Mapping) and isinstance(i.get("turns"), int | float)
    ]
    return {"feedback/turns_per_episode": sum(turns) / len(turns)} if turns else {}
