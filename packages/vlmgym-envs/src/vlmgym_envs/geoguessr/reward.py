"""The GeoGuessr reward: per-level correctness, the curriculum of stages, and its schedule.

Levels of a guess (each 0 or 1, except distance):

    country   the guessed country is the true one (ISO alpha-2, any spelling: `country_code`)
    region    country correct and the region names the true GeoNames admin1
    city      region correct and the city names the true GeoNames place
    distance  GeoScore / 5000 = exp(-d / 1492.7), d the haversine km to the true point
              (0 without coordinates)

A level the text leaves out (or names unrecognisably) is read from the predicted coordinates,
reverse-geocoded with GeoNames; a region left out is also read from the named city when
GeoNames puts every place of that name in the country in one region. A level the text
names wrongly stays wrong: text wins over coordinates.

The reward of a stage is a fixed weighted sum of the levels, `STAGE_WEIGHTS[stage]`:

    stage 0  country                              1.0 * country
    stage 1  + region                             0.5 * country + 0.5 * region
    stage 2  + city                               0.3 * country + 0.3 * region + 0.4 * city
    stage 3  + distance                           0.2 * country + 0.2 * region + 0.2 * city
                                                  + 0.4 * distance

The weights are non-negative and a missing field scores 0 at its level, so emitting fewer
fields never pays more than emitting correct ones; the reward lies in [0, 1].

`Curriculum` decides the stage: fixed, by episode count, or by running accuracy.
`EpisodeSchedule` (run by `EpisodeCurriculum`) sets stages by episode count alone: the
curriculum of the `v1` reward and of `geospot`. `make_curriculum` builds an env's curriculum
from its `curriculum` and `stage` keywords.
"""

from __future__ import annotations

import collections
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from vlmgym_envs.geoguessr.answer import GeoGuess
from vlmgym_envs.geoguessr.geography import (
    GEOSCORE_MAX,
    country_code,
    geonames,
    geoscore,
    haversine_km,
    name_candidates,
    names_match,
    normalize_name,
    reverse_geocode,
    same_admin_name,
)

LEVELS: tuple[str, ...] = ("country", "region", "city", "distance")
STAGE_NAMES: tuple[str, ...] = ("country", "region", "city", "distance")
STAGE_WEIGHTS: tuple[tuple[float, float, float, float], ...] = (
    (1.0, 0.0, 0.0, 0.0),
    (0.5, 0.5, 0.0, 0.0),
    (0.3, 0.3, 0.4, 0.0),
    (0.2, 0.2, 0.2, 0.4),
)


@dataclass(frozen=True)
class GeoTruth:
    """The true location of an image: OSV-5M's labels (GeoNames spellings) and point."""

    latitude: float
    longitude: float
    country: str  # ISO alpha-2
    region: str = ""  # GeoNames admin1
    sub_region: str = ""  # GeoNames admin2
    city: str = ""  # GeoNames place name


@dataclass(frozen=True)
class LevelScores:
    """How a guess scored at each level, and where each predicted level came from.

    sources: level -> "text", "coordinates", "city" (region inferred from the city) or
        "missing".
    """

    country: bool
    region: bool
    city: bool
    distance_km: float | None
    geoscore: float
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def values(self) -> tuple[float, float, float, float]:
        """(country, region, city, GeoScore / 5000), each in [0, 1]."""
        return (
            float(self.country),
            float(self.region),
            float(self.city),
            self.geoscore / GEOSCORE_MAX,
        )


@functools.cache
def _city_regions() -> dict[tuple[str, str], frozenset[str]]:
    """(cc, normalised place name) -> the admin1 names of GeoNames places so named."""
    table = geonames()
    index: dict[tuple[str, str], set[str]] = {}
    for name, admin1, cc in zip(table.name, table.admin1, table.cc, strict=True):
        index.setdefault((cc, normalize_name(name)), set()).add(admin1)
    return {k: frozenset(v) for k, v in index.items()}


def score_levels(guess: GeoGuess, truth: GeoTruth) -> LevelScores:
    """Score a parsed guess against the truth at every level (see the module docstring)."""
    sources: dict[str, str] = {}
    place = None
    distance = None
    if guess.has_coordinates:
        lat, lon = float(guess.latitude), float(guess.longitude)  # type: ignore[arg-type]
        place = reverse_geocode(lat, lon)[0]
        d = float(haversine_km(lat, lon, truth.latitude, truth.longitude))
        distance = d if math.isfinite(d) else None

    cc = country_code(guess.country) if guess.country else None
    if cc is not None:
        sources["country"] = "text"
    elif place is not None:
        cc, sources["country"] = place.cc, "coordinates"
    else:
        sources["country"] = "missing"
    country_ok = cc is not None and cc == truth.country.upper()

    region_ok = False
    if guess.region:
        sources["region"] = "text"
        region_ok = names_match(guess.region, truth.region)
    elif place is not None:
        sources["region"] = "coordinates"
        region_ok = place.cc == cc and same_admin_name(place.admin1, truth.region)
    elif guess.city and cc is not None:
        regions = _city_regions().get((cc, normalize_name(name_candidates(guess.city)[-1])))
        if regions is not None and len(regions) == 1:
            sources["region"] = "city"
            region_ok = same_admin_name(next(iter(regions)), truth.region)
        else:
            sources["region"] = "missing"
    else:
        sources["region"] = "missing"
    region_ok = country_ok and region_ok

    city_ok = False
    if guess.city:
        sources["city"] = "text"
        city_ok = names_match(guess.city, truth.city)
    elif place is not None:
        sources["city"] = "coordinates"
        city_ok = same_admin_name(place.name, truth.city)
    else:
        sources["city"] = "missing"
    city_ok = region_ok and city_ok

    score = float(geoscore(distance)) if distance is not None else 0.0
    return LevelScores(country_ok, region_ok, city_ok, distance, score, sources)


def stage_reward(levels: LevelScores, stage: int) -> float:
    """The reward of `levels` at curriculum `stage` (0..3): `STAGE_WEIGHTS[stage]` dot the
    level values."""
    if not 0 <= stage < len(STAGE_WEIGHTS):
        raise ValueError(f"stage must be in 0..{len(STAGE_WEIGHTS) - 1}, got {stage}")
    return float(np.dot(STAGE_WEIGHTS[stage], levels.values))


def geo_reward(guess: GeoGuess, truth: GeoTruth, stage: int) -> tuple[float, LevelScores]:
    """The pure reward function: (reward in [0, 1], the per-level scores behind it)."""
    levels = score_levels(guess, truth)
    return stage_reward(levels, stage), levels


# Curriculum ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CurriculumConfig:
    """When the stages unlock.

    mode:
        "fixed": always `start_stage`.
        "steps": stage k (k = 1..3) unlocks once `stage_steps[k - 1]` episodes were scored
            (or the trainer called `Curriculum.set_step`).
        "accuracy": stage k + 1 unlocks once the running accuracy of level k (country for
            stage 0, region for 1, city for 2) over the last `window` scored episodes
            reaches `accuracy_thresholds[k]`.
    start_stage: the first stage (0..3).
    """

    mode: Literal["fixed", "steps", "accuracy"] = "accuracy"
    start_stage: int = 0
    stage_steps: tuple[int, int, int] = (2_000, 4_000, 6_000)
    accuracy_thresholds: tuple[float, float, float] = (0.5, 0.3, 0.1)
    window: int = 256

    def __post_init__(self) -> None:
        if self.mode not in ("fixed", "steps", "accuracy"):
            raise ValueError(f"unknown curriculum mode {self.mode!r}")
        if not 0 <= self.start_stage < len(STAGE_WEIGHTS):
            raise ValueError(f"start_stage must be in 0..3, got {self.start_stage}")
        if len(self.stage_steps) != 3 or list(self.stage_steps) != sorted(self.stage_steps):
            raise ValueError(f"stage_steps must be 3 non-decreasing counts: {self.stage_steps}")
        if len(self.accuracy_thresholds) != 3 or self.window < 1:
            raise ValueError("need 3 accuracy_thresholds and window >= 1")


class Curriculum:
    """The running curriculum state of one environment (not thread-safe)."""

    def __init__(self, config: CurriculumConfig | None = None) -> None:
        self.config = config or CurriculumConfig()
        self.episodes = 0
        self._stage = self.config.start_stage
        self._recent: collections.deque[bool] = collections.deque(maxlen=self.config.window)

    @property
    def stage(self) -> int:
        cfg = self.config
        if cfg.mode == "steps":
            unlocked = sum(self.episodes >= s for s in cfg.stage_steps)
            return max(cfg.start_stage, unlocked)
        return self._stage

    def set_step(self, episodes: int) -> None:
        """Set the count the "steps" mode reads (e.g. the trainer's sample count)."""
        self.episodes = int(episodes)

    def record(self, levels: LevelScores) -> None:
        """Count one scored episode and update the running accuracy."""
        self.episodes += 1
        cfg = self.config
        if cfg.mode != "accuracy" or self._stage >= len(STAGE_WEIGHTS) - 1:
            return
        self._recent.append(bool((levels.country, levels.region, levels.city)[self._stage]))
        full = len(self._recent) == self._recent.maxlen
        if full and np.mean(self._recent) >= cfg.accuracy_thresholds[self._stage]:
            self._stage += 1
            self._recent.clear()

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state, for checkpoints."""
        return {"episodes": self.episodes, "stage": self._stage, "recent": list(self._recent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.episodes = int(state["episodes"])
        self._stage = int(state["stage"])
        self._recent.clear()
        self._recent.extend(bool(x) for x in state["recent"])


@dataclass(frozen=True)
class EpisodeSchedule:
    """Stages by episode count, the curriculum of the `v1` reward and of `geospot`.

    starts: stage k applies once `starts[k]` episodes were scored (non-decreasing, from 0).
    fixed_stage: always this stage instead (the envs' `stage=` keyword).
    """

    starts: tuple[int, ...]
    fixed_stage: int | None = None

    def __post_init__(self) -> None:
        starts = tuple(self.starts)
        if not starts or starts[0] != 0 or list(starts) != sorted(starts):
            raise ValueError(f"starts must be non-decreasing episode counts from 0: {starts}")
        if self.fixed_stage is not None and not 0 <= self.fixed_stage < len(starts):
            raise ValueError(f"stage must be in 0..{len(starts) - 1}, got {self.fixed_stage}")

    def stage_at(self, episodes: int) -> int:
        """The stage after `episodes` scored episodes: the last k with starts[k] <= episodes."""
        if self.fixed_stage is not None:
            return self.fixed_stage
        return max(k for k, start in enumerate(self.starts) if start <= max(episodes, 0))


class EpisodeCurriculum:
    """The running state of an `EpisodeSchedule`: the count of scored episodes.

    Same interface as `Curriculum` (`stage`, `record`, `set_step`, `state_dict`).
    """

    def __init__(self, schedule: EpisodeSchedule) -> None:
        self.config = schedule
        self.episodes = 0

    @property
    def stage(self) -> int:
        return self.config.stage_at(self.episodes)

    def set_step(self, episodes: int) -> None:
        """Set the episode count (e.g. the trainer's sample count, on resume)."""
        self.episodes = int(episodes)

    def record(self, levels: LevelScores | None = None) -> None:
        """Count one scored episode (`levels` is not read)."""
        self.episodes += 1

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state, for checkpoints."""
        return {"episodes": self.episodes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.episodes = int(state["episodes"])


def make_curriculum(
    curriculum: CurriculumConfig | EpisodeSchedule | None,
    stage: int | None,
    default: EpisodeSchedule | None = None,
) -> Curriculum | EpisodeCurriculum:
    """An env's running curriculum from its `curriculum` and `stage` keywords.

    default: the reward's own schedule, or None for the levels reward (`STAGE_WEIGHTS`),
    which also takes a `CurriculumConfig` (its default: by running accuracy). A schedule
    must have as many stages as the reward; `stage` fixes one (and overrides `curriculum`).
    """
    n_stages = len(STAGE_WEIGHTS) if default is None else len(default.starts)
    if curriculum is not None and not isinstance(curriculum, CurriculumConfig | EpisodeSchedule):
        raise TypeError(f"curriculum must be a CurriculumConfig or EpisodeSchedule: {curriculum!r}")
    if isinstance(curriculum, CurriculumConfig) and default is not None:
        raise TypeError("this reward's curriculum is an EpisodeSchedule, not a CurriculumConfig")
    if isinstance(curriculum, EpisodeSchedule):
        schedule = curriculum
    elif default is not None:
        schedule = default
    else:
        if stage is not None:
            curriculum = CurriculumConfig(mode="fixed", start_stage=stage)
        return Curriculum(curriculum)
    if len(schedule.starts) != n_stages:
        raise ValueError(f"the schedule needs {n_stages} stages, got starts={schedule.starts}")
    if stage is not None:
        schedule = EpisodeSchedule(schedule.starts, fixed_stage=stage)
    return EpisodeCurriculum(schedule)
