"""Reading a GeoGuessr answer (country, region, city, latitude, longitude) out of model text.

The prompt asks for `GEO_ANSWER_FORMAT`; the parser also reads what models write instead:

- `key: value` lines, several on one line, markdown emphasis (`**Country:** France`),
  `key = value`, and key aliases (state/province for region, town for city, lat/lng...);
- JSON objects anywhere in the text (`{"country": "France", "lat": 48.85, ...}`), also
  nested one level and with `"coordinates": [lat, lon]`;
- coordinates as `48.85`, `-33.9`, `48,85` (decimal comma), `48.85° N`, `S 33.9`,
  `48°51'24"N`, `48.85 north`, or a pair `48.85° N, 2.35° E` / `(48.85, 2.35)`, in a
  coordinates field or in surrounding prose;
- a country named in prose ("I think this is France") when no country field is given.

When a field occurs several times the last one wins (models tend to revise towards the end).
Never raises; `GeoGuess.errors` names every value it found but could not read, and
`GeoGuess.missing` every field it did not find.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from vlmgym_envs.core import as_text

GEO_FIELDS: tuple[str, ...] = ("country", "region", "city", "latitude", "longitude")

GEO_ANSWER_FORMAT = (
    "country: <country name>\n"
    "region: <state, province or region>\n"
    "city: <city or town>\n"
    "latitude: <decimal degrees, positive north>\n"
    "longitude: <decimal degrees, positive east>"
)

# Text longer than this is read as its first and last halves of this budget.
MAX_GEO_CHARS = 16_000

_KEY_ALIASES: dict[str, str] = {
    "country": "country", "nation": "country",
    "region": "region", "state": "region", "province": "region", "admin1": "region",
    "city": "city", "town": "city", "village": "city", "locality": "city",
    "latitude": "latitude", "lat": "latitude",
    "longitude": "longitude", "long": "longitude", "lon": "longitude", "lng": "longitude",
    "coordinates": "coordinates", "coordinate": "coordinates", "coords": "coordinates",
    "gps": "coordinates", "latlon": "coordinates", "lat lon": "coordinates",
    "lat long": "coordinates", "lat lng": "coordinates",
}  # fmt: skip

_KEYS = sorted(_KEY_ALIASES, key=len, reverse=True)
_KEY_RE = re.compile(
    r"(?<![A-Za-z0-9])[\"'*_`#>\- ]{0,8}("
    + "|".join(k.replace(" ", r"[ /,_-]{0,3}") for k in _KEYS)
    + r")[\"'*_`]{0,4} ?(?:\([^()\n]{0,40}\))? ?[\"'*_`]{0,4} ?[:=] ?",
    re.IGNORECASE,
)
_NUM = r"\d{1,3}(?:[.,]\d+)?"
_HEM = r"(?:[NSEW](?:orth|outh|ast|est)?)(?![A-Za-z])"
_COORD_RE = re.compile(
    rf"(?P<pre>{_HEM})? ?(?P<sign>[-+])? ?(?<![\d.])(?P<deg>{_NUM})(?![\d])"
    r" ?(?P<degsym>°|deg(?:rees?)?(?![A-Za-z]))?"
    rf"(?: ?(?P<min>\d{{1,2}}(?:[.,]\d+)?) ?['\u2032\u2019])?"
    rf"(?: ?(?P<sec>\d{{1,2}}(?:[.,]\d+)?) ?(?:[\"″”]|''))?"
    rf" ?(?P<hem>{_HEM})?",
    re.IGNORECASE,
)
_PAIR_GAP = re.compile(r"[\s,;/|()\[\]]*")
_BLANKS = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n(?:[^\S\n]*\n)+")


@dataclass(frozen=True)
class GeoGuess:
    """A parsed answer. Text fields are as written (stripped); coordinates in degrees.

    errors: one message per value that was found but could not be read, e.g.
        "latitude: '123.4' is out of range".
    """

    country: str | None = None
    region: str | None = None
    city: str | None = None
    latitude: float | None = None
    longitude: float | None = None
    errors: tuple[str, ...] = field(default=())

    @property
    def missing(self) -> tuple[str, ...]:
        """The fields of `GEO_FIELDS` that were not read."""
        return tuple(f for f in GEO_FIELDS if getattr(self, f) is None)

    @property
    def has_coordinates(self) -> bool:
        return self.latitude is not None and self.longitude is not None

    def as_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in GEO_FIELDS}


def _clean(text: object) -> str:
    s = as_text(text)
    if len(s) > MAX_GEO_CHARS:
        s = s[: MAX_GEO_CHARS // 2] + "\n" + s[-MAX_GEO_CHARS // 2 :]
    s = s.replace("º", "°").replace("˚", "°").replace("\u2212", "-").replace("\u2013", "-")
    s = unicodedata.normalize("NFKC", s)
    s = "".join(ch if ch == "\n" or unicodedata.category(ch)[0] != "C" else " " for ch in s)
    # Runs of blanks collapse to one, so no pattern below ever backtracks over a long run.
    s = _BLANKS.sub(" ", s)
    return _BLANK_LINES.sub("\n", s)


def _strip_value(value: str) -> str:
    return value.strip().strip(" \t\"'*_`,;.{}[]").strip()


def parse_coordinate(value: object, axis: str) -> tuple[float | None, str]:
    """Read one coordinate for `axis` ("latitude" or "longitude") from a value string.

    Returns (degrees, "") or (None, reason). South and west (by letter or word) are negative;
    a letter of the other axis (latitude "2.35 E") or an out-of-range value is an error.
    """
    s = _clean(value)
    for m in _COORD_RE.finditer(s):
        return _coordinate_from_match(m, axis)
    return None, f"{axis}: no number in {_preview(s)}"


def _coordinate_from_match(m: re.Match[str], axis: str) -> tuple[float | None, str]:
    try:
        deg = float(m["deg"].replace(",", "."))
        if m["min"]:
            deg += float(m["min"].replace(",", ".")) / 60
        if m["sec"]:
            deg += float(m["sec"].replace(",", ".")) / 3600
    except ValueError:
        return None, f"{axis}: cannot read {_preview(m.group(0))}"
    hem = (m["hem"] or m["pre"] or "")[:1].upper()
    allowed = "NS" if axis == "latitude" else "EW"
    if hem and hem not in allowed:
        return None, f"{axis}: hemisphere {hem!r} in {_preview(m.group(0))}"
    negative = m["sign"] == "-" or hem in ("S", "W")
    value = -deg if negative else deg
    limit = 90.0 if axis == "latitude" else 180.0
    if not math.isfinite(value) or abs(value) > limit:
        return None, f"{axis}: {_preview(m.group(0))} is out of range"
    return value, ""


def _axis_of(m: re.Match[str]) -> str | None:
    hem = (m["hem"] or m["pre"] or "")[:1].upper()
    return {"N": "latitude", "S": "latitude", "E": "longitude", "W": "longitude"}.get(hem)


def _looks_like_coordinate(m: re.Match[str]) -> bool:
    return bool(m["degsym"] or m["hem"] or m["pre"] or "." in m["deg"])


def _pair(s: str, strict: bool) -> tuple[float | None, float | None, str]:
    matches = [m for m in _COORD_RE.finditer(s) if not strict or _looks_like_coordinate(m)]
    candidates = []
    for a, b in itertools.pairwise(matches):
        if _PAIR_GAP.fullmatch(s, a.end(), b.start()):
            candidates.append((a, b))
    if not candidates:
        return None, None, "" if strict else f"coordinates: no pair in {_preview(s)}"
    a, b = candidates[-1] if strict else candidates[0]
    axis_a, axis_b = _axis_of(a), _axis_of(b)
    if axis_a == "longitude" or axis_b == "latitude":
        a, b = b, a
    lat, err_lat = _coordinate_from_match(a, "latitude")
    lon, err_lon = _coordinate_from_match(b, "longitude")
    return lat, lon, "; ".join(e for e in (err_lat, err_lon) if e)


def _preview(s: str, n: int = 40) -> str:
    s = s.strip()
    return repr(s if len(s) <= n else s[:n] + "...")


def _json_fields(s: str) -> dict[str, Any]:
    """Fields from JSON objects in the text (the last object with a known key wins)."""
    decoder = json.JSONDecoder()
    found: dict[str, Any] = {}
    start = s.find("{")
    attempts = 0
    while start != -1 and attempts < 64:
        attempts += 1
        try:
            obj, end = decoder.raw_decode(s, start)
        except (json.JSONDecodeError, RecursionError):
            start = s.find("{", start + 1)
            continue
        if isinstance(obj, dict):
            fields = _fields_of(obj)
            if fields:
                found.update(fields)
        start = s.find("{", end)
    return found


def _fields_of(obj: dict[Any, Any], depth: int = 0) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key, value in obj.items():
        name = _KEY_ALIASES.get(str(key).strip().lower().replace("_", " "))
        if isinstance(value, dict) and depth < 2:
            nested = _fields_of(value, depth + 1)
            if name == "coordinates" and not nested:
                continue
            fields.update(nested)
        elif name is not None and value is not None:
            fields[name] = value
    return fields


def _key_value_fields(s: str) -> dict[str, str]:
    """`key: value` pairs; a value runs to the end of its line or to the next key."""
    fields: dict[str, str] = {}
    matches = list(_KEY_RE.finditer(s))
    for i, m in enumerate(matches):
        end = s.find("\n", m.end())
        end = len(s) if end == -1 else end
        if i + 1 < len(matches):
            end = min(end, matches[i + 1].start())
        value = _strip_value(s[m.end() : end])
        name = _KEY_ALIASES[" ".join(re.split(r"[\s/,_-]+", m.group(1).lower()))]
        if value:
            fields[name] = value
    return fields


def _prose_country(s: str) -> str | None:
    """The last country name (4+ characters, up to 4 words) mentioned in prose."""
    from vlmgym_envs.geoguessr.geography import country_aliases_for_prose, normalize_name

    aliases = country_aliases_for_prose()
    words = normalize_name(s[-4000:]).split()
    last = None
    for i in range(len(words)):
        for n in (4, 3, 2, 1):
            phrase = " ".join(words[i : i + n])
            if len(words[i : i + n]) == n and phrase in aliases:
                last = phrase
                break
    return last


def parse_geo_answer(text: object) -> GeoGuess:
    """Parse model text into a `GeoGuess` (see the module docstring). Never raises."""
    s = _clean(text)
    errors: list[str] = []
    fields: dict[str, Any] = dict(_key_value_fields(s))
    fields.update(_json_fields(s))

    out: dict[str, Any] = {}
    for name in ("country", "region", "city"):
        value = fields.get(name)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = _strip_value(str(value))
            if value and len(value) <= 100:
                out[name] = value
            elif value:
                errors.append(f"{name}: value too long ({len(value)} characters)")
        elif value is not None:
            errors.append(f"{name}: not a name: {_preview(str(value))}")

    for axis in ("latitude", "longitude"):
        value = fields.get(axis)
        if value is None:
            continue
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = repr(float(value)) if math.isfinite(value) else "nan"
        coordinate, error = parse_coordinate(str(value), axis)
        if coordinate is None:
            errors.append(error)
        else:
            out[axis] = coordinate

    if "latitude" not in out or "longitude" not in out:
        pair = fields.get("coordinates")
        lat = lon = None
        if isinstance(pair, list | tuple) and len(pair) == 2:
            pair = f"{pair[0]}, {pair[1]}"
        if isinstance(pair, str):
            lat, lon, error = _pair(_clean(pair), strict=False)
            if error:
                errors.append(error)
        elif pair is not None:
            errors.append(f"coordinates: cannot read {_preview(str(pair))}")
        if (
            lat is None
            and lon is None
            and not fields.get("latitude")
            and not fields.get("longitude")
        ):
            lat, lon, _ = _pair(s, strict=True)
        if "latitude" not in out and lat is not None:
            out["latitude"] = lat
        if "longitude" not in out and lon is not None:
            out["longitude"] = lon

    if "country" not in out:
        prose = _prose_country(s)
        if prose is not None:
            out["country"] = prose
    return GeoGuess(**out, errors=tuple(errors))
