"""The `v1` reward of `osv5m` (`reward="v1"`): the earlier version's reward, kept for runs
that migrate from it (sdan/vlm-gym, `envs/osv5m.py`).

    hierarchical = w_country [country right] + w_region [region right] + w_city [city right]
    distance     = exp(-d / 300),  d the haversine km from the guessed coordinates to the
                   photo (no term without coordinates)
    format       = 1 when the answer gives all five fields (country, region, city,
                   latitude, longitude), else 0
    reward       = clip(max(hierarchical, distance) + 0.05 format, 0, 1)

Each level is read from the text alone and on its own, as the earlier version did: the
country by ISO code (`country_code`), region and city by name (`names_match`); a right
region under a wrong country counts, and coordinates count only through the distance term.

Weights by stage (`V1_STAGE_WEIGHTS`; stage k from `V1_STAGE_STARTS[k]` scored episodes on,
the earlier version's default schedule {0: country, 1000: region, 2000: city}). They are
not renormalised, so a right country alone is worth 0.2 at every stage:

    stage  start   country  region  city
    0          0     0.2     0.0    0.0
    1       1000     0.2     0.3    0.0
    2       2000     0.2     0.3    0.5

The earlier version gave the 0.05 to any answer with two of the fields in `key: value`
lines; here it needs all five. The max lets coordinates dominate: a close guess alone
scores up to 1 whatever the names say (README).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vlmgym_envs.geoguessr.answer import GeoGuess
from vlmgym_envs.geoguessr.geography import country_code, haversine_km, names_match
from vlmgym_envs.geoguessr.reward import EpisodeSchedule, GeoTruth

V1_STAGE_WEIGHTS: tuple[tuple[float, float, float], ...] = (
    (0.2, 0.0, 0.0),
    (0.2, 0.3, 0.0),
    (0.2, 0.3, 0.5),
)
V1_STAGE_STARTS: tuple[int, ...] = (0, 1000, 2000)
V1_SCHEDULE = EpisodeSchedule(V1_STAGE_STARTS)
V1_DISTANCE_SCALE_KM = 300.0
V1_FORMAT_BONUS = 0.05


@dataclass(frozen=True)
class V1Score:
    """A `v1` reward and its terms.

    hits: (country, region, city) right, each read from the text alone.
    distance_term: exp(-d / 300), None without coordinates.
    """

    reward: float
    hierarchical: float
    distance_term: float | None
    format_ok: bool
    hits: tuple[bool, bool, bool]


def v1_reward(guess: GeoGuess, truth: GeoTruth, stage: int) -> V1Score:
    """The `v1` reward of a parsed guess at curriculum `stage` (0..2; module docstring)."""
    if not 0 <= stage < len(V1_STAGE_WEIGHTS):
        raise ValueError(f"stage must be in 0..{len(V1_STAGE_WEIGHTS) - 1}, got {stage}")
    hits = (
        guess.country is not None and country_code(guess.country) == truth.country.upper(),
        guess.region is not None and names_match(guess.region, truth.region),
        guess.city is not None and names_match(guess.city, truth.city),
    )
    hierarchical = sum(w for w, hit in zip(V1_STAGE_WEIGHTS[stage], hits, strict=True) if hit)
    distance_term = None
    if guess.has_coordinates:
        d = float(haversine_km(guess.latitude, guess.longitude, truth.latitude, truth.longitude))
        if math.isfinite(d):
            distance_term = math.exp(-d / V1_DISTANCE_SCALE_KM)
    format_ok = not guess.missing
    best = max(hierarchical, distance_term if distance_term is not None else 0.0)
    reward = min(max(best + V1_FORMAT_BONUS * format_ok, 0.0), 1.0)
    return V1Score(float(reward), float(hierarchical), distance_term, format_ok, hits)
