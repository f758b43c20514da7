"""`osv5m` (alias `geoguessr`) and `geospot`: GeoGuessr on OpenStreetView-5M.

Data: `dataset.OSV5MDataset` (the published layout, DATA.md; `data_dir` or the Hugging Face
hub cache). Images are read one at a time on `reset`, within `ImageLimits`
(`max_image_pixels`, `max_decoded_pixels`, `max_image_bytes`); one that cannot be shown
raises `SkipTask`. `env.skipped()` reports those and the CSV rows left out while loading
("bad_coordinates", "missing_image", "malformed_row").

The prompt asks for `GEO_ANSWER_FORMAT`; `step` parses the answer (`parse_geo_answer`) and
scores it at the curriculum stage fixed when the episode was reset: with `geo_reward` by
default, with `reward_v1.v1_reward` for `reward="v1"`. `geospot` reads the same data, asks
for `GEOSPOT_ANSWER_FORMAT` and scores with `geospot.geospot_reward`. Both envs' info holds
the levels of `score_levels` (`country_correct`..., `distance_km`), which `step_metrics`
(`geo_step_metrics`) summarises.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vlmgym_envs.core import Env, Observation, StepResult, system_message, user_message
from vlmgym_envs.data.images import (
    DEFAULT_MAX_DECODED_PIXELS,
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageLimits,
)
from vlmgym_envs.geoguessr.answer import GEO_ANSWER_FORMAT, GeoGuess, parse_geo_answer
from vlmgym_envs.geoguessr.dataset import OSV5MDataset
from vlmgym_envs.geoguessr.geospot import GEOSPOT_SCHEDULE, geospot_reward
from vlmgym_envs.geoguessr.reward import (
    Curriculum,
    CurriculumConfig,
    EpisodeCurriculum,
    EpisodeSchedule,
    GeoTruth,
    LevelScores,
    make_curriculum,
    score_levels,
    stage_reward,
)
from vlmgym_envs.geoguessr.reward_v1 import V1_SCHEDULE, v1_reward

GEOSPOT_ANSWER_FORMAT = (
    "City: <city or town>\n"
    "Region: <state, province or region>\n"
    "Country: <country name>\n"
    "Latitude: <decimal degrees, positive north>\n"
    "Longitude: <decimal degrees, positive east>"
)
GEOSPOT_PROMPT = (
    "In which place was this street-level photo taken? Reason from what you see (plants, "
    "road markings, signs, buildings, the side of the road cars drive on), then reply with "
    "exactly these five lines and nothing after them:\n" + GEOSPOT_ANSWER_FORMAT
)
GEO_PROMPT = (
    "Where was this street-level photo taken? Look for clues such as vegetation, roads, "
    "signs, architecture and driving side. Answer in exactly this format, one field per "
    "line:\n" + GEO_ANSWER_FORMAT
)


@dataclass(frozen=True)
class OSV5MState:
    """One episode: the record's id and truth, and the curriculum stage it is scored at."""

    idx: int
    id: str
    truth: GeoTruth
    stage: int


class OSV5MEnv(Env[OSV5MState]):
    """GeoGuessr on OSV-5M (see the module docstring).

    data_dir, split, image_dir, max_rows, on_missing_image, download: see `OSV5MDataset`.
    reward: "levels" (default: `geo_reward`, fixed non-negative weights of the levels and
        the distance at each of 4 stages) or "v1" (the earlier version's reward,
        `reward_v1.v1_reward`: max(levels, exp(-d / 300)) + 0.05 format, 3 stages).
    curriculum: when stages unlock: a `CurriculumConfig` for "levels" (default: by running
        accuracy); an `EpisodeSchedule` for either (default for "v1": `V1_SCHEDULE`,
        stages from 0, 1000 and 2000 scored episodes).
    stage: shortcut for a fixed stage (overrides `curriculum`).
    max_image_side: downscale images so their longer side is at most this.
    max_image_pixels, max_decoded_pixels, max_image_bytes: the image limits
        (`data.images.ImageLimits`: downscale to this many pixels; skip an image declaring
        more pixels, or a file or zip member of more bytes).
    """

    REWARDS: tuple[str, ...] = ("levels", "v1")

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        split: str = "test",
        *,
        reward: Literal["levels", "v1"] = "levels",
        curriculum: CurriculumConfig | EpisodeSchedule | None = None,
        stage: int | None = None,
        max_image_side: int | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        max_decoded_pixels: int = DEFAULT_MAX_DECODED_PIXELS,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        system_prompt: str | None = None,
        prompt: str = GEO_PROMPT,
        **dataset_kwargs: Any,
    ) -> None:
        if reward not in self.REWARDS:
            raise ValueError(f"reward must be one of {self.REWARDS}, got {reward!r}")
        self.reward = reward
        self.curriculum = self._make_curriculum(curriculum, stage)
        self.image_limits = ImageLimits(
            max_image_pixels=max_image_pixels,
            max_side=max_image_side,
            max_decoded_pixels=max_decoded_pixels,
            max_image_bytes=max_image_bytes,
        )
        self.dataset = OSV5MDataset(data_dir, split, **dataset_kwargs)
        self.system_prompt = system_prompt
        self.prompt = prompt

    def _make_curriculum(
        self, curriculum: CurriculumConfig | EpisodeSchedule | None, stage: int | None
    ) -> Curriculum | EpisodeCurriculum:
        default = V1_SCHEDULE if self.reward == "v1" else None
        return make_curriculum(curriculum, stage, default)

    def __len__(self) -> int:
        return len(self.dataset)

    def skipped(self) -> dict[str, int]:
        """Rows left out of the CSV and images `reset` could not show, per reason."""
        return dict(self.dataset.skips)

    def state_dict(self) -> dict[str, Any]:
        """The curriculum's progress (episodes scored, stage), for checkpoints."""
        return {"curriculum": self.curriculum.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "curriculum" in state:
            self.curriculum.load_state_dict(dict(state["curriculum"]))

    def reset(self, idx: int) -> tuple[OSV5MState, Observation]:
        i = self.check_index(idx)
        record = self.dataset.records[i]
        image = self.dataset.image(i, self.image_limits)
        messages = [user_message(self.prompt, [image])]
        if self.system_prompt:
            messages.insert(0, system_message(self.system_prompt))
        state = OSV5MState(i, record.id, record.truth, self.curriculum.stage)
        return state, Observation(messages)

    def metrics(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """OSV-5M's official metrics (`osv5m_metrics`) and `unparsed_coordinates`, the count
        of answers without a readable coordinate pair."""
        from vlmgym_envs.geoguessr.metrics import osv5m_metrics

        guesses = [_guess(r) for r in records]
        out = osv5m_metrics(
            [lat for lat, _ in guesses],
            [lon for _, lon in guesses],
            [r["state"]["truth"]["latitude"] for r in records],
            [r["state"]["truth"]["longitude"] for r in records],
        )
        out["unparsed_coordinates"] = float(sum(math.isnan(lat) for lat, _ in guesses))
        return out

    def plots(self, records: Sequence[Mapping[str, Any]], out_dir: Path) -> list[Path]:
        """`world_scatter.png` (guesses against truths, joined by error lines) and
        `distance_hist.png`. Needs matplotlib (installed with vlmgym-train)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out_dir = Path(out_dir)
        fig, ax = plt.subplots(figsize=(10, 5))
        ax.set_xlim(-180, 180)
        ax.set_ylim(-90, 90)
        ax.set_xlabel("longitude")
        ax.set_ylabel("latitude")
        ax.set_title("guesses (x) against truths (o)")
        ax.grid(alpha=0.3)
        dists = []
        for r in records:
            truth = r["state"]["truth"]
            lat, lon = _guess(r)
            ax.plot(truth["longitude"], truth["latitude"], "o", color="tab:green", ms=3)
            if math.isnan(lat) or math.isnan(lon):
                continue
            ax.plot(lon, lat, "x", color="tab:red", ms=3)
            ax.plot(
                [truth["longitude"], lon],
                [truth["latitude"], lat],
                "-",
                color="grey",
                lw=0.5,
                alpha=0.6,
            )
            if r["info"].get("distance_km") is not None:
                dists.append(float(r["info"]["distance_km"]))
        written = [out_dir / "world_scatter.png", out_dir / "distance_hist.png"]
        fig.savefig(written[0], dpi=120, bbox_inches="tight")
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.hist(dists or [0.0], bins=30, color="tab:blue")
        ax.set_xlabel("distance to truth (km)")
        ax.set_ylabel("images")
        ax.set_title("distance histogram")
        fig.savefig(written[1], dpi=120, bbox_inches="tight")
        plt.close(fig)
        return written

    def step(self, state: OSV5MState, text: str) -> StepResult[OSV5MState]:
        guess = parse_geo_answer(text)
        levels = score_levels(guess, state.truth)
        self.curriculum.record(levels)
        info = level_info(state.stage, guess, levels)
        return StepResult(reward=self._score(state, guess, levels, info), done=True, info=info)

    def _score(
        self, state: OSV5MState, guess: GeoGuess, levels: LevelScores, info: dict[str, Any]
    ) -> float:
        """The reward of `guess`; adds the reward's own terms to `info`."""
        if self.reward == "v1":
            score = v1_reward(guess, state.truth, state.stage)
            info["v1"] = {
                "hierarchical": score.hierarchical,
                "distance_term": score.distance_term,
                "format": score.format_ok,
            }
            return score.reward
        return stage_reward(levels, state.stage)

    def step_metrics(self, infos: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """`geo_step_metrics`: shares within 25 / 100 / 500 km, distance percentiles and
        per-level accuracies under `geo/`."""
        from vlmgym_envs.geoguessr.metrics import geo_step_metrics

        return geo_step_metrics(infos)


class GeospotEnv(OSV5MEnv):
    """`geospot`: OSV-5M scored by distance kernels per field (`geospot.geospot_reward`).

    The same data and keywords as `OSV5MEnv` but `reward`; the prompt asks for
    `GEOSPOT_ANSWER_FORMAT`. curriculum: an `EpisodeSchedule` of 5 stages (default
    `GEOSPOT_SCHEDULE`: stages from 0, 100, 300, 600 and 1000 scored episodes); stage: a
    fixed stage 0..4. `curriculum.state_dict()` holds the episode count for checkpoints.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        split: str = "test",
        *,
        curriculum: EpisodeSchedule | None = None,
        stage: int | None = None,
        prompt: str = GEOSPOT_PROMPT,
        **kwargs: Any,
    ) -> None:
        if "reward" in kwargs:
            raise TypeError("geospot has one reward; use osv5m for reward=...")
        super().__init__(
            data_dir, split, curriculum=curriculum, stage=stage, prompt=prompt, **kwargs
        )
        self.reward = "geospot"

    def _make_curriculum(
        self, curriculum: CurriculumConfig | EpisodeSchedule | None, stage: int | None
    ) -> Curriculum | EpisodeCurriculum:
        return make_curriculum(curriculum, stage, GEOSPOT_SCHEDULE)

    def _score(
        self, state: OSV5MState, guess: GeoGuess, levels: LevelScores, info: dict[str, Any]
    ) -> float:
        score = geospot_reward(guess, state.truth, state.stage)
        info["geospot"] = {
            "distance_km": score.distances_km,
            "kernel": score.kernels,
            "weight": score.weights,
            "resolved_weight": score.resolved_weight,
            "resolved": score.places,
        }
        return score.reward


def level_info(stage: int, guess: GeoGuess, levels: LevelScores) -> dict[str, Any]:
    """The info every GeoGuessr env returns: the parse and the levels (`score_levels`)."""
    return {
        "stage": stage,
        "parsed": guess.as_dict(),
        "missing": list(guess.missing),
        "parse_errors": list(guess.errors),
        "country_correct": levels.country,
        "region_correct": levels.region,
        "city_correct": levels.city,
        "distance_km": levels.distance_km,
        "geoscore": levels.geoscore,
        "sources": dict(levels.sources),
    }


def _guess(record: Mapping[str, Any]) -> tuple[float, float]:
    """An evaluation record's parsed (latitude, longitude); NaN for what was not read."""
    parsed = record["info"].get("parsed") or {}
    lat, lon = parsed.get("latitude"), parsed.get("longitude")
    return (
        float("nan") if lat is None else float(lat),
        float("nan") if lon is None else float(lon),
    )
