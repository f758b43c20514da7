"""Geography, answer parsing, the GeoGuessr reward and curriculum, OSV-5M's metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vlmgym_envs.geoguessr.answer import GeoGuess, parse_geo_answer
from vlmgym_envs.geoguessr.geography import (
    country_code,
    geoscore,
    haversine_km,
    normalize_name,
    reverse_geocode,
    same_admin_name,
)
from vlmgym_envs.geoguessr.metrics import MAX_DISTANCE_KM, OSV5MMetrics, osv5m_metrics
from vlmgym_envs.geoguessr.reward import (
    STAGE_WEIGHTS,
    Curriculum,
    CurriculumConfig,
    GeoTruth,
    geo_reward,
    score_levels,
    stage_reward,
)

PARIS = (48.8566, 2.3522)
BERLIN = (52.5200, 13.4050)
PARIS_TRUTH = GeoTruth(48.8566, 2.3522, "FR", "Ile-de-France", "Paris", "Paris")


def test_paris_berlin_distance_and_geoscore():
    d = float(haversine_km(*PARIS, *BERLIN))
    assert d == pytest.approx(877.5, abs=1.0)  # "about 878 km"
    assert float(geoscore(d)) == pytest.approx(5000 * math.exp(-d / 1492.7))
    assert float(geoscore(d)) == pytest.approx(2777.6, abs=1.0)
    assert float(geoscore(0.0)) == 5000.0
    # Quarter of a meridian: pi/2 * R.
    assert float(haversine_km(0, 0, 90, 0)) == pytest.approx(math.pi / 2 * 6371)
    assert float(haversine_km(0, 179.5, 0, -179.5)) == pytest.approx(111.19, abs=0.01)


@pytest.mark.parametrize(
    "name",
    [
        "Deutschland",
        "Germany",
        "DE",
        "de",
        "DEU",
        "germany ",
        "Allemagne",
        "Federal Republic of Germany",
    ],
)
def test_country_aliases_match_de(name):
    assert country_code(name) == "DE"


@pytest.mark.parametrize(
    ("name", "code"),
    [("Côte d'Ivoire", "CI"), ("cote divoire", None), ("Ivory Coast", "CI"), ("USA", "US"),
     ("the Netherlands", "NL"), ("Holland", "NL"), ("España", "ES"), ("ESPANA", "ES"),
     ("Türkiye", "TR"), ("Россия", "RU"), ("日本", "JP"), ("France (FR)", "FR"),
     ("Atlantis", None), ("", None)],
)  # fmt: skip
def test_country_aliases(name, code):
    assert country_code(name) == code


def test_name_matching_ignores_accents_case_and_generic_words():
    assert normalize_name("Île-de-France") == "ile de france"
    assert normalize_name("Łódź") == "lodz"
    assert same_admin_name("ÎLE DE FRANCE", "Ile-de-France")
    assert same_admin_name("Buryatiya", "Respublika Buryatiya")
    assert same_admin_name("State of Sao Paulo", "São Paulo")
    assert not same_admin_name("Bavaria", "Saxony")
    assert not same_admin_name("", "")


def test_reverse_geocode_matches_reverse_geocoder():
    import reverse_geocoder

    rng = np.random.default_rng(0)
    points = np.c_[rng.uniform(-60, 75, 100), rng.uniform(-180, 180, 100)]
    ours = reverse_geocode(points[:, 0], points[:, 1])
    theirs = reverse_geocoder.search([tuple(map(float, p)) for p in points], mode=1, verbose=False)
    for o, t in zip(ours, theirs, strict=True):
        assert (o.name, o.admin1, o.admin2, o.cc) == (t["name"], t["admin1"], t["admin2"], t["cc"])
    [paris] = reverse_geocode(*PARIS)
    assert (paris.name, paris.admin1, paris.cc) == ("Paris", "Ile-de-France", "FR")
    assert reverse_geocode(float("nan"), 0.0) == [None]


# Parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("country: France\nregion: Île-de-France\ncity: Paris\n"
         "latitude: 48.8566\nlongitude: 2.3522",
         ("France", "Île-de-France", "Paris", 48.8566, 2.3522)),
        ("**Country:** Germany\n**State**: Bavaria\nTown: Munich\nLat: 48,137 | Lng: 11,575",
         ("Germany", "Bavaria", "Munich", 48.137, 11.575)),
        ('Sure! {"country": "Deutschland", "city": "Berlin", "coordinates": [52.52, 13.405]} ok',
         ("Deutschland", None, "Berlin", 52.52, 13.405)),
        ('```json\n{"answer": {"country": "Japan", "lat": 35.68, "lon": 139.69}}\n```',
         ("Japan", None, None, 35.68, 139.69)),
        ("I believe this is Brazil, near 23.55° S, 46.63° W.",
         ("brazil", None, None, -23.55, -46.63)),
        ("coordinates: 2.35° E, 48.85° N", (None, None, None, 48.85, 2.35)),
        ("latitude: 48°51'24\"N\nlongitude: 2°21'0\"E",
         (None, None, None, 48 + 51 / 60 + 24 / 3600, 2.35)),
        ("latitude: 33.9 south\nlongitude: 151.2 E", (None, None, None, -33.9, 151.2)),
        ("country: FR\ncountry: DE", ("DE", None, None, None, None)),
        ("Latitude = -33,86; Longitude = 151,21", (None, None, None, -33.86, 151.21)),
    ],
)  # fmt: skip
def test_parse_geo_answer(text, expected):
    g = parse_geo_answer(text)
    country, region, city, lat, lon = expected
    assert (g.country, g.region, g.city) == (country, region, city)
    for got, want in ((g.latitude, lat), (g.longitude, lon)):
        assert (got is None) == (want is None)
        if want is not None:
            assert got == pytest.approx(want)


def test_parse_names_what_it_could_not_read():
    g = parse_geo_answer("latitude: 123.4\nlongitude: 2.3 N\ncountry: ")
    assert g.latitude is None and g.longitude is None
    assert any("latitude" in e and "out of range" in e for e in g.errors)
    assert any("longitude" in e and "hemisphere" in e for e in g.errors)
    assert set(g.missing) == {"country", "region", "city", "latitude", "longitude"}


NASTY = st.one_of(
    st.text(max_size=400),
    st.text(alphabet="0123456789.,-+°'\" NSEWnsew:latitudeongcry\n{}[]", max_size=300),
    st.builds(
        lambda a, b: f"latitude: {a}\nlongitude: {b}", st.text(max_size=30), st.text(max_size=30)
    ),
    st.builds(lambda x: f'{{"country": {x!r}, "lat": "{x}"}}', st.text(max_size=50)),
    st.just("1" * 20_000),
    st.just(" " * 20_000 + "1"),
    st.just("\n\n" * 10_000),
    st.just("{" * 5000),
    st.just("latitude:" * 3000),
)


@settings(max_examples=400, deadline=None)
@given(NASTY)
def test_parse_geo_answer_never_raises(text):
    g = parse_geo_answer(text)
    if g.latitude is not None:
        assert -90 <= g.latitude <= 90
    if g.longitude is not None:
        assert -180 <= g.longitude <= 180


@settings(max_examples=100, deadline=None)
@given(st.floats(-90, 90), st.floats(-180, 180))
def test_formatted_coordinates_round_trip(lat, lon):
    g = parse_geo_answer(f"latitude: {lat:.5f}\nlongitude: {lon:.5f}")
    assert g.latitude == pytest.approx(round(lat, 5), abs=1e-9)
    assert g.longitude == pytest.approx(round(lon, 5), abs=1e-9)
    h = parse_geo_answer(
        f"{abs(lat):.4f}° {'N' if lat >= 0 else 'S'}, {abs(lon):.4f}° {'E' if lon >= 0 else 'W'}"
    )
    assert h.latitude == pytest.approx(round(abs(lat), 4) * (1 if lat >= 0 else -1), abs=1e-9)
    assert h.longitude == pytest.approx(round(abs(lon), 4) * (1 if lon >= 0 else -1), abs=1e-9)


# Reward ------------------------------------------------------------------------------------


def test_levels_from_text_and_coordinates():
    full = GeoGuess("France", "Ile de France", "Paris", *PARIS)
    levels = score_levels(full, PARIS_TRUTH)
    assert (levels.country, levels.region, levels.city) == (True, True, True)
    assert levels.distance_km == pytest.approx(0.0, abs=1e-6) and levels.geoscore == pytest.approx(
        5000
    )
    coords_only = score_levels(GeoGuess(latitude=48.85, longitude=2.35), PARIS_TRUTH)
    assert (coords_only.country, coords_only.region, coords_only.city) == (True, True, True)
    assert coords_only.sources == {
        "country": "coordinates",
        "region": "coordinates",
        "city": "coordinates",
    }
    # Text wins over coordinates: a wrong region named stays wrong.
    wrong_text = score_levels(GeoGuess("FR", "Normandy", None, *PARIS), PARIS_TRUTH)
    assert (wrong_text.country, wrong_text.region, wrong_text.city) == (True, False, False)
    berlin = score_levels(
        GeoGuess("Deutschland", latitude=BERLIN[0], longitude=BERLIN[1]), PARIS_TRUTH
    )
    assert (berlin.country, berlin.region, berlin.city) == (False, False, False)
    assert berlin.distance_km == pytest.approx(877.5, abs=1.0)
    # A region left out is read from a city GeoNames places in one region.
    city_only = score_levels(GeoGuess("France", None, "Paris"), PARIS_TRUTH)
    assert city_only.sources["region"] == "city" and city_only.region and city_only.city


def test_stage_rewards_hand_computed():
    berlin = GeoGuess("Germany", latitude=BERLIN[0], longitude=BERLIN[1])
    gs = 5000 * math.exp(-float(haversine_km(*BERLIN, *PARIS)) / 1492.7)
    assert [geo_reward(berlin, PARIS_TRUTH, s)[0] for s in range(4)] == pytest.approx(
        [0.0, 0.0, 0.0, 0.4 * gs / 5000]
    )
    country_only = GeoGuess("France")
    assert [geo_reward(country_only, PARIS_TRUTH, s)[0] for s in range(4)] == pytest.approx(
        [1.0, 0.5, 0.3, 0.2]
    )
    perfect = GeoGuess("France", "Île-de-France", "Paris", *PARIS)
    assert [geo_reward(perfect, PARIS_TRUTH, s)[0] for s in range(4)] == pytest.approx([1.0] * 4)
    assert geo_reward(GeoGuess(), PARIS_TRUTH, 3)[0] == 0.0
    assert all(abs(sum(w) - 1.0) < 1e-12 and min(w) >= 0 for w in STAGE_WEIGHTS)
    with pytest.raises(ValueError):
        stage_reward(score_levels(perfect, PARIS_TRUTH), 4)


TRUTHS = [
    PARIS_TRUTH,
    GeoTruth(52.52, 13.405, "DE", "Berlin", "", "Mitte"),
    GeoTruth(-33.8688, 151.2093, "AU", "New South Wales", "Sydney", "Sydney"),
]
NAMES = ["France", "Germany", "Bavaria", "Paris", "Mitte", "Berlin", "Sydney", "New South Wales"]
names = st.one_of(st.none(), st.sampled_from([*NAMES, "xyz"]))


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(TRUTHS),
    names,
    names,
    names,
    st.one_of(st.none(), st.tuples(st.floats(-90, 90), st.floats(-180, 180))),
    st.integers(0, 3),
    st.sampled_from(["country", "region", "city", "coordinates"]),
)
def test_fewer_fields_never_pay_more_than_correct_ones(
    truth, country, region, city, coords, stage, field
):
    lat, lon = coords if coords else (None, None)
    guess = dict(country=country, region=region, city=city, latitude=lat, longitude=lon)
    dropped, correct = dict(guess), dict(guess)
    if field == "coordinates":
        dropped.update(latitude=None, longitude=None)
        correct.update(latitude=truth.latitude, longitude=truth.longitude)
    else:
        dropped[field] = None
        correct[field] = {"country": truth.country, "region": truth.region, "city": truth.city}[
            field
        ]
    r_dropped = geo_reward(GeoGuess(**dropped), truth, stage)[0]
    r_correct = geo_reward(GeoGuess(**correct), truth, stage)[0]
    assert 0.0 <= r_dropped <= 1.0 and 0.0 <= r_correct <= 1.0
    assert r_correct >= r_dropped - 1e-12


def test_curriculum_by_steps_and_accuracy():
    levels_right = score_levels(GeoGuess("France"), PARIS_TRUTH)
    levels_wrong = score_levels(GeoGuess("Spain"), PARIS_TRUTH)
    steps = Curriculum(CurriculumConfig(mode="steps", stage_steps=(2, 4, 6)))
    seen = []
    for _ in range(7):
        seen.append(steps.stage)
        steps.record(levels_wrong)
    assert seen == [0, 0, 1, 1, 2, 2, 3]
    steps.set_step(0)
    assert steps.stage == 0

    acc = Curriculum(
        CurriculumConfig(mode="accuracy", window=4, accuracy_thresholds=(0.5, 0.5, 0.5))
    )
    for levels in (levels_wrong, levels_wrong, levels_wrong, levels_right):
        acc.record(levels)
    assert acc.stage == 0  # 1/4 < 0.5
    acc.record(levels_right)
    assert acc.stage == 1  # the last 4: 2/4 >= 0.5
    acc.record(levels_wrong)
    assert acc.stage == 1  # the window restarts for the region level
    state = acc.state_dict()
    restored = Curriculum(acc.config)
    restored.load_state_dict(state)
    assert restored.stage == 1 and restored.episodes == acc.episodes

    fixed = Curriculum(CurriculumConfig(mode="fixed", start_stage=2))
    for _ in range(10):
        fixed.record(levels_right)
    assert fixed.stage == 2
    with pytest.raises(ValueError):
        CurriculumConfig(mode="sometimes")


# Official metrics --------------------------------------------------------------------------


def test_osv5m_metrics_hand_computed():
    true_lat, true_lon = [PARIS[0], PARIS[0], PARIS[0]], [PARIS[1], PARIS[1], PARIS[1]]
    pred_lat, pred_lon = [48.8567, BERLIN[0], float("nan")], [2.3523, BERLIN[1], float("nan")]
    m = osv5m_metrics(pred_lat, pred_lon, true_lat, true_lon)
    d_berlin = float(haversine_km(*PARIS, *BERLIN))
    d_near = float(haversine_km(*PARIS, 48.8567, 2.3523))
    distances = [d_near, d_berlin, MAX_DISTANCE_KM]
    assert m["distance_mean_km"] == pytest.approx(np.mean(distances))
    assert m["distance_median_km"] == pytest.approx(d_berlin)
    assert m["geoscore"] == pytest.approx(
        np.mean([5000 * math.exp(-d / 1492.7) for d in distances])
    )
    assert (
        m["acc_country"]
        == m["acc_region"]
        == m["acc_area"]
        == m["acc_city"]
        == pytest.approx(1 / 3)
    )
    assert m["acc_1km"] == pytest.approx(1 / 3)
    assert m["acc_750km"] == pytest.approx(1 / 3)
    assert m["acc_2500km"] == pytest.approx(2 / 3)
    acc = OSV5MMetrics()
    acc.update(pred_lat[:2], pred_lon[:2], true_lat[:2], true_lon[:2])
    acc.update(pred_lat[2:], pred_lon[2:], true_lat[2:], true_lon[2:])
    assert acc.compute() == m


def test_osv5m_level_definitions():
    # Two points in the same admin1 and country but different cities: region right, city wrong.
    m = osv5m_metrics([48.80], [2.13], [PARIS[0]], [PARIS[1]])  # Versailles vs Paris
    assert m["acc_country"] == 1.0 and m["acc_region"] == 1.0 and m["acc_city"] == 0.0
    with pytest.raises(ValueError):
        osv5m_metrics([], [], [], [])
