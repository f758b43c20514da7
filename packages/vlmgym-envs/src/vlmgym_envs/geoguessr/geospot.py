"""The `geospot` reward: distance kernels per answered field, normalised over the fields
that resolve, with a five-stage curriculum by episode count.

Fields f: country, region, city (names) and coords (the latitude / longitude pair).

    d_f  = haversine km between the point the guessed field resolves to and the point the
           true label of the same level resolves to (`gazetteer`: country centre, admin1
           centre, GeoNames place; the true city is the same-named place nearest the photo),
           or the photo's own point when the true label does not resolve; for coords, the
           km from the guessed pair to the photo's point.
    k_f  = exp(-d_f / tau_f),  tau = 2000 km (country), 500 (region), 100 (city), 25 (coords)
    R    = the fields of the guess that resolve: a name the gazetteer finds (the region
           within the guessed country first, the city within the guessed region, then
           country), coordinates that parse
    reward = sum_{f in R} w_f k_f / sum_{f in R} w_f     (0 when that sum is 0)

A correct name resolves to the same point as the truth, so it scores k_f = 1. Weights by
stage (`GEOSPOT_STAGES`, stage k from `start` scored episodes on), with
w_coords = max(w_city, 0.5 w_region):

    stage  start   country  region  city   coords
    0          0     1.0     0.0    0.0    0.0
    1        100     0.5     0.0    0.0    0.0
    2        300     0.3     0.4    0.0    0.2
    3        600     0.2     0.3    0.3    0.3
    4       1000     0.15    0.25   0.4    0.4

These are the stages of sdan/vlm-gym's `envs/geospot.py` (its stage 1 weighs only the
country, 0.5, so after normalisation it scores as stage 0 does). The denominator counts only
resolved fields, so leaving a field out (or writing one that does not resolve) never costs
anything: a confident country alone scores as well as a full correct answer (README).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from vlmgym_envs.geoguessr.answer import GeoGuess
from vlmgym_envs.geoguessr.gazetteer import Gazetteer, NamedPoint, gazetteer
from vlmgym_envs.geoguessr.geography import haversine_km
from vlmgym_envs.geoguessr.reward import EpisodeSchedule, GeoTruth

GEOSPOT_FIELDS: tuple[str, ...] = ("country", "region", "city", "coords")
GEOSPOT_TAUS_KM: dict[str, float] = {
    "country": 2000.0, "region": 500.0, "city": 100.0, "coords": 25.0,
}  # fmt: skip


@dataclass(frozen=True)
class GeospotStage:
    """One curriculum stage: from `start` scored episodes on, these field weights."""

    start: int
    country: float
    region: float
    city: float

    @property
    def coords(self) -> float:
        """w_coords = max(w_city, 0.5 w_region)."""
        return max(self.city, 0.5 * self.region)

    def weights(self) -> dict[str, float]:
        return {f: float(getattr(self, f)) for f in GEOSPOT_FIELDS}


GEOSPOT_STAGES: tuple[GeospotStage, ...] = (
    GeospotStage(0, 1.0, 0.0, 0.0),
    GeospotStage(100, 0.5, 0.0, 0.0),
    GeospotStage(300, 0.3, 0.4, 0.0),
    GeospotStage(600, 0.2, 0.3, 0.3),
    GeospotStage(1000, 0.15, 0.25, 0.4),
)
GEOSPOT_SCHEDULE = EpisodeSchedule(tuple(s.start for s in GEOSPOT_STAGES))


@dataclass(frozen=True)
class GeospotScore:
    """A geospot reward and what it was made of.

    distances_km / kernels: per field of `GEOSPOT_FIELDS`; None / 0.0 where the guessed
        field did not resolve.
    weights: the stage's weights. resolved_weight: their sum over resolved fields.
    places: what each resolved name resolved to ("Paris, Ile-de-France, FR").
    """

    reward: float
    distances_km: dict[str, float | None]
    kernels: dict[str, float]
    weights: dict[str, float]
    resolved_weight: float
    places: dict[str, str] = field(default_factory=dict)


def resolve_guess(guess: GeoGuess, places: Gazetteer) -> dict[str, NamedPoint | None]:
    """The points of a guess's country, region and city (None: missing or unresolved)."""
    country = places.country(guess.country) if guess.country else None
    cc = country.cc if country else None
    region = places.region(guess.region, cc) if guess.region else None
    city = places.city(guess.city, region=region, cc=cc) if guess.city else None
    return {"country": country, "region": region, "city": city}


def resolve_truth(truth: GeoTruth, places: Gazetteer) -> dict[str, tuple[float, float]]:
    """The points of the true labels, each falling back to the photo's point."""
    point = (truth.latitude, truth.longitude)
    country = places.country(truth.country) if truth.country else None
    region = places.region(truth.region, truth.country, anywhere=False) if truth.region else None
    city = (
        places.city(truth.city, region=region, cc=truth.country, near=point) if truth.city else None
    )
    found = {"country": country, "region": region, "city": city}
    return {f: (p.latitude, p.longitude) if p else point for f, p in found.items()}


def geospot_reward(
    guess: GeoGuess, truth: GeoTruth, stage: int, places: Gazetteer | None = None
) -> GeospotScore:
    """The geospot reward of a parsed guess at curriculum `stage` (module docstring).

    Deterministic; `places` defaults to the cached `gazetteer()`.
    """
    if not 0 <= stage < len(GEOSPOT_STAGES):
        raise ValueError(f"stage must be in 0..{len(GEOSPOT_STAGES) - 1}, got {stage}")
    places = places or gazetteer()
    guessed = resolve_guess(guess, places)
    true_points = resolve_truth(truth, places)
    distances: dict[str, float | None] = {}
    for f, point in guessed.items():
        distances[f] = (
            None
            if point is None
            else float(haversine_km(point.latitude, point.longitude, *true_points[f]))
        )
    distances["coords"] = None
    if guess.has_coordinates:
        d = float(haversine_km(guess.latitude, guess.longitude, truth.latitude, truth.longitude))
        distances["coords"] = d if math.isfinite(d) else None

    weights = GEOSPOT_STAGES[stage].weights()
    kernels = {
        f: 0.0 if d is None else math.exp(-d / GEOSPOT_TAUS_KM[f]) for f, d in distances.items()
    }
    resolved = [f for f in GEOSPOT_FIELDS if distances[f] is not None]
    total = sum(weights[f] for f in resolved)
    reward = sum(weights[f] * kernels[f] for f in resolved) / total if total > 0 else 0.0
    return GeospotScore(
        reward=float(min(max(reward, 0.0), 1.0)),
        distances_km=distances,
        kernels=kernels,
        weights=weights,
        resolved_weight=float(total),
        places={f: p.label() for f, p in guessed.items() if p is not None},
    )
