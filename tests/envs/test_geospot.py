"""The GeoGuessr reward variants (osv5m's `v1`, `geospot`), their curricula, the offline
gazetteer, the training-step geo metrics and the env-name aliases.

Most geospot cases run on a tiny GeoNames table written here, every place on the equator,
so each distance is R * (degrees of longitude apart) and every expected reward is written
from the formulas by hand.
"""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import vlmgym_envs
from fixtures.datasets import jpeg, write_osv5m
from hypothesis import given, settings
from hypothesis import strategies as st
from vlmgym_envs.geoguessr.answer import GeoGuess
from vlmgym_envs.geoguessr.gazetteer import Gazetteer, gazetteer
from vlmgym_envs.geoguessr.geography import GeoNamesTable
from vlmgym_envs.geoguessr.geospot import GEOSPOT_SCHEDULE, GEOSPOT_STAGES, geospot_reward
from vlmgym_envs.geoguessr.metrics import MAX_DISTANCE_KM, geo_step_metrics
from vlmgym_envs.geoguessr.reward import (
    CurriculumConfig,
    EpisodeCurriculum,
    EpisodeSchedule,
    GeoTruth,
)
from vlmgym_envs.geoguessr.reward_v1 import V1_SCHEDULE, V1_STAGE_WEIGHTS, v1_reward

DEG_KM = 6371.0 * math.pi / 180  # one degree of a great circle, km

# name, admin1, cc, longitude (latitude 0). FR: North = {10, 12} -> centre 11, South =
# {18, 20} -> 19, FR -> 15; DE: East = {39.9, 40, 50, 50.1} -> 45 = DE. "Alpha" is in
# North (10), South (20) and East (50, the densest: 50.1 lies within 0.25 degrees).
TINY_PLACES = [
    ("Alpha", "North", "FR", 10.0), ("Beta", "North", "FR", 12.0),
    ("Gamma", "South", "FR", 18.0), ("Alpha", "South", "FR", 20.0),
    ("Outskirts", "East", "DE", 39.9), ("Delta", "East", "DE", 40.0),
    ("Alpha", "East", "DE", 50.0), ("Suburb", "East", "DE", 50.1),
]  # fmt: skip
TINY_TRUTH = GeoTruth(0.0, 11.0, "FR", "North", "", "Alpha")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Gazetteer:
    path = tmp_path_factory.mktemp("geonames") / "places.csv"
    rows = [f"0,{lon},{name},{admin1},,{cc}" for name, admin1, cc, lon in TINY_PLACES]
    path.write_text("lat,lon,name,admin1,admin2,cc\n" + "\n".join(rows) + "\n")
    return Gazetteer(GeoNamesTable(path))


def k(d_deg: float, tau_km: float) -> float:
    """exp(-d / tau) for a distance of `d_deg` degrees along the equator."""
    return math.exp(-d_deg * DEG_KM / tau_km)


# Gazetteer ---------------------------------------------------------------------------------


def test_tiny_gazetteer_points(tiny):
    for name in ("France", "FR", "Frankreich"):
        france = tiny.country(name)
        assert (france.cc, france.latitude) == ("FR", pytest.approx(0.0, abs=1e-9))
        assert france.longitude == pytest.approx(15.0)
    assert tiny.country("Germany").longitude == pytest.approx(45.0)
    assert tiny.country("Atlantis") is None and tiny.country("Spain") is None  # no places
    north = tiny.region("north province", "FR")  # generic words ignored
    assert (north.admin1, north.longitude) == ("North", pytest.approx(11.0))
    assert tiny.region("East", "FR").cc == "DE"  # not in FR: any country
    assert tiny.region("East", "FR", anywhere=False) is None
    assert tiny.region("Atlantis") is None
    # Alpha: in the region, else the country, else the densest anywhere; or nearest `near`.
    assert tiny.city("Alpha", region=tiny.region("South", "FR"), cc="FR").longitude == 20.0
    assert tiny.city("Alpha", cc="FR").longitude == 10.0  # two in FR, equally dense: first
    assert tiny.city("Alpha").longitude == 50.0
    assert tiny.city("Alpha", near=(0.0, 19.0)).longitude == 20.0
    assert tiny.city("Beta", cc="DE").longitude == 12.0  # none in DE: anywhere
    assert tiny.city("Alpha, somewhere").name == "Alpha"
    assert tiny.city("Xyzzyville") is None


def test_real_gazetteer_prefers_the_guessed_region_and_country():
    places = gazetteer()
    paris = places.city("Paris")
    assert (paris.cc, paris.admin1) == ("FR", "Ile-de-France")
    texas = places.region("Texas", "US")
    assert places.city("Paris", region=texas, cc="US").label() == "Paris, Texas, US"
    assert places.city("Paris", cc="CA").admin1 == "Ontario"
    france = places.country("France")
    assert 42 < france.latitude < 51.5 and -5 < france.longitude < 8.5
    assert places.region("Île-de-France", "FR").admin1 == "Ile-de-France"


# geospot -----------------------------------------------------------------------------------

W4 = {"country": 0.15, "region": 0.25, "city": 0.4, "coords": 0.4}  # stage 4
W2 = {"country": 0.3, "region": 0.4, "city": 0.0, "coords": 0.2}  # stage 2

GEOSPOT_CASES = [
    # (guess, stage, expected reward)
    ("perfect", GeoGuess("France", "North", "Alpha", 0.0, 11.0), 4, 1.0),
    ("confident country only", GeoGuess("France"), 4, 1.0),
    ("coordinates only, 1 degree off", GeoGuess(latitude=0.0, longitude=12.0), 4, k(1, 25)),
    ("wrong country only", GeoGuess("Germany"), 4, k(30, 2000)),
    ("unresolvable region, no city",
     GeoGuess("France", "Atlantis", None, 0.0, 12.0), 4,
     (W4["country"] + W4["coords"] * k(1, 25)) / (W4["country"] + W4["coords"])),
    ("wrong region, its Alpha",  # South (19) vs North (11); Alpha in South (20) vs 10
     GeoGuess("France", "South", "Alpha"), 4,
     (W4["country"] + W4["region"] * k(8, 500) + W4["city"] * k(10, 100))
     / (W4["country"] + W4["region"] + W4["city"])),
    ("city alone: the densest Alpha", GeoGuess(city="Alpha"), 4, k(40, 100)),
    ("region outside the guessed country",  # North is only in FR: found there
     GeoGuess("Germany", "North"), 4,
     (W4["country"] * k(30, 2000) + W4["region"]) / (W4["country"] + W4["region"])),
    ("nothing", GeoGuess(), 4, 0.0),
    ("unresolvable names only", GeoGuess("Atlantis", "Nowhere", "Xyzzyville"), 4, 0.0),
    ("stage 0 ignores coordinates", GeoGuess(latitude=0.0, longitude=11.0), 0, 0.0),
    ("stage 0: country only", GeoGuess("Germany", latitude=0.0, longitude=11.0), 0, k(30, 2000)),
    ("stage 1 scores as stage 0", GeoGuess("Germany", "North", "Alpha", 0.0, 11.0), 1,
     k(30, 2000)),
    ("stage 2: the city weighs 0",
     GeoGuess("France", "North", "Gamma", 0.0, 12.0), 2,
     (W2["country"] + W2["region"] + W2["coords"] * k(1, 25))
     / (W2["country"] + W2["region"] + W2["coords"])),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "guess", "stage", "expected"), GEOSPOT_CASES, ids=[c[0] for c in GEOSPOT_CASES]
)
def test_geospot_reward_hand_computed(tiny, name, guess, stage, expected):
    score = geospot_reward(guess, TINY_TRUTH, stage, places=tiny)
    assert score.reward == pytest.approx(expected, rel=1e-9, abs=1e-12), name
    assert 0.0 <= score.reward <= 1.0


def test_geospot_score_terms_and_truth_fallback(tiny):
    score = geospot_reward(GeoGuess("Germany", "Atlantis", "Alpha"), TINY_TRUTH, 4, places=tiny)
    assert score.distances_km["country"] == pytest.approx(30 * DEG_KM)
    assert score.distances_km["region"] is None and score.distances_km["coords"] is None
    # The city is looked for in the guessed country (DE): Alpha at 50, the truth's at 10.
    assert score.distances_km["city"] == pytest.approx(40 * DEG_KM)
    assert score.resolved_weight == pytest.approx(W4["country"] + W4["city"])
    assert score.places == {"country": "DE", "city": "Alpha, East, DE"}
    # A true label that does not resolve falls back to the photo's point (here 13 E).
    truth = GeoTruth(0.0, 13.0, "FR", "Nowhere", "", "Nowhere")
    score = geospot_reward(GeoGuess(None, "North", "Beta"), truth, 4, places=tiny)
    assert score.distances_km["region"] == pytest.approx(2 * DEG_KM)  # centre 11 vs 13
    assert score.distances_km["city"] == pytest.approx(1 * DEG_KM)  # Beta 12 vs 13
    with pytest.raises(ValueError):
        geospot_reward(GeoGuess(), TINY_TRUTH, 5, places=tiny)


@pytest.mark.parametrize(
    ("episodes", "stage"),
    [(0, 0), (99, 0), (100, 1), (299, 1), (300, 2), (599, 2), (600, 3), (999, 3),
     (1000, 4), (10**6, 4)],
)  # fmt: skip
def test_geospot_curriculum_boundaries(episodes, stage):
    curriculum = EpisodeCurriculum(GEOSPOT_SCHEDULE)
    curriculum.set_step(episodes)
    assert curriculum.stage == stage
    expected = [
        {"country": 1.0, "region": 0.0, "city": 0.0, "coords": 0.0},
        {"country": 0.5, "region": 0.0, "city": 0.0, "coords": 0.0},
        {"country": 0.3, "region": 0.4, "city": 0.0, "coords": 0.2},
        {"country": 0.2, "region": 0.3, "city": 0.3, "coords": 0.3},
        {"country": 0.15, "region": 0.25, "city": 0.4, "coords": 0.4},
    ][stage]
    assert GEOSPOT_STAGES[stage].weights() == pytest.approx(expected)


@pytest.mark.parametrize(
    ("episodes", "stage"), [(0, 0), (999, 0), (1000, 1), (1999, 1), (2000, 2), (5000, 2)]
)
def test_v1_curriculum_boundaries(episodes, stage):
    curriculum = EpisodeCurriculum(V1_SCHEDULE)
    curriculum.set_step(episodes)
    assert curriculum.stage == stage
    assert V1_STAGE_WEIGHTS[stage] == [(0.2, 0, 0), (0.2, 0.3, 0), (0.2, 0.3, 0.5)][stage]


def test_episode_schedule_checks_and_checkpoint():
    with pytest.raises(ValueError):
        EpisodeSchedule((5, 10))
    with pytest.raises(ValueError):
        EpisodeSchedule((0, 10, 5))
    with pytest.raises(ValueError):
        EpisodeSchedule((0, 10), fixed_stage=2)
    curriculum = EpisodeCurriculum(EpisodeSchedule((0, 2)))
    curriculum.record()
    assert curriculum.stage == 0
    curriculum.record()
    assert curriculum.stage == 1 and curriculum.state_dict() == {"episodes": 2}
    restored = EpisodeCurriculum(EpisodeSchedule((0, 2)))
    restored.load_state_dict(curriculum.state_dict())
    assert restored.stage == 1
    assert EpisodeSchedule((0, 2), fixed_stage=0).stage_at(100) == 0


# v1 ----------------------------------------------------------------------------------------

PARIS_TRUTH = GeoTruth(48.8566, 2.3522, "FR", "Ile-de-France", "Paris", "Paris")
ONE_DEG_NORTH = (49.8566, 2.3522)  # exactly DEG_KM from the truth, along the meridian
V1_CLOSE = math.exp(-DEG_KM / 300)

V1_CASES = [
    # (name, guess, stage, expected)
    ("perfect, clipped", GeoGuess("France", "Île-de-France", "Paris", 48.8566, 2.3522), 2, 1.0),
    ("country only", GeoGuess("France"), 0, 0.2),
    ("country only, later stage: weights are not renormalised", GeoGuess("France"), 2, 0.2),
    ("coordinates only", GeoGuess(latitude=ONE_DEG_NORTH[0], longitude=ONE_DEG_NORTH[1]), 2,
     V1_CLOSE),
    ("five fields, names wrong: the distance wins",
     GeoGuess("France", "Normandy", "Rouen", *ONE_DEG_NORTH), 2, V1_CLOSE + 0.05),
    ("five fields, far: the names win",
     GeoGuess("France", "Ile-de-France", "Paris", 52.52, 13.405), 0, 0.2 + 0.05),
    ("unresolvable country, region and city right (each level on its own)",
     GeoGuess("Atlantis", "Ile de France", "Paris"), 2, 0.3 + 0.5),
    ("same at stage 0", GeoGuess("Atlantis", "Ile de France", "Paris"), 0, 0.0),
    ("stage 1", GeoGuess("FR", "Ile de France", "Paris"), 1, 0.2 + 0.3),
    ("nothing", GeoGuess(), 2, 0.0),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "guess", "stage", "expected"), V1_CASES, ids=[c[0] for c in V1_CASES]
)
def test_v1_reward_hand_computed(name, guess, stage, expected):
    score = v1_reward(guess, PARIS_TRUTH, stage)
    assert score.reward == pytest.approx(expected, rel=1e-9, abs=1e-12), name


def test_v1_terms():
    score = v1_reward(GeoGuess("France", "Normandy", "Rouen", *ONE_DEG_NORTH), PARIS_TRUTH, 2)
    assert score.hits == (True, False, False) and score.format_ok
    assert score.hierarchical == pytest.approx(0.2)
    assert score.distance_term == pytest.approx(V1_CLOSE)
    assert v1_reward(GeoGuess("France"), PARIS_TRUTH, 2).distance_term is None
    with pytest.raises(ValueError):
        v1_reward(GeoGuess(), PARIS_TRUTH, 3)


# Envs ----------------------------------------------------------------------------------------

PERFECT_PARIS = (
    "City: Paris\nRegion: Ile-de-France\nCountry: France\nLatitude: 48.8566\nLongitude: 2.3522"
)


def test_osv5m_v1_env(tmp_path):
    write_osv5m(tmp_path)
    env = vlmgym_envs.make("osv5m", data_dir=tmp_path, reward="v1")
    state, _ = env.reset(0)
    assert state.stage == 0
    result = env.step(state, "Country: France")
    assert result.reward == pytest.approx(0.2)
    assert result.info["v1"] == {"hierarchical": 0.2, "distance_term": None, "format": False}
    assert result.info["country_correct"] and result.info["distance_km"] is None
    assert env.step(state, PERFECT_PARIS).reward == 1.0
    assert env.curriculum.state_dict() == {"episodes": 2}
    env.curriculum.set_step(1000)
    assert env.reset(0)[0].stage == 1
    fixed = vlmgym_envs.make("osv5m", data_dir=tmp_path, reward="v1", stage=2)
    assert fixed.reset(0)[0].stage == 2
    custom = vlmgym_envs.make(
        "osv5m", data_dir=tmp_path, reward="v1", curriculum=EpisodeSchedule((0, 1, 2))
    )
    custom.step(custom.reset(0)[0], "")
    assert custom.reset(0)[0].stage == 1
    with pytest.raises(ValueError, match="stage"):
        vlmgym_envs.make("osv5m", data_dir=tmp_path, reward="v1", stage=3)
    with pytest.raises(ValueError, match="reward"):
        vlmgym_envs.make("osv5m", data_dir=tmp_path, reward="v2")
    with pytest.raises(TypeError):
        vlmgym_envs.make("osv5m", data_dir=tmp_path, reward="v1", curriculum=CurriculumConfig())
    # The default reward is unchanged; it takes a schedule of its 4 stages too.
    default = vlmgym_envs.make("osv5m", data_dir=tmp_path, stage=0)
    assert default.step(default.reset(0)[0], "Country: France").reward == 1.0
    by_count = vlmgym_envs.make(
        "osv5m", data_dir=tmp_path, curriculum=EpisodeSchedule((0, 1, 2, 3))
    )
    by_count.step(by_count.reset(0)[0], "")
    by_count.step(by_count.reset(0)[0], "")
    assert by_count.reset(0)[0].stage == 2
    with pytest.raises(ValueError, match="4 stages"):
        vlmgym_envs.make("osv5m", data_dir=tmp_path, curriculum=EpisodeSchedule((0, 1)))


def test_geospot_env(tmp_path):
    write_osv5m(tmp_path)
    env = vlmgym_envs.make("geospot", data_dir=tmp_path)
    assert isinstance(env, vlmgym_envs.resolve("osv5m"))
    state, obs = env.reset(0)
    assert state.stage == 0 and state.truth.city == "Paris"
    for key in ("City:", "Region:", "Country:", "Latitude:", "Longitude:"):
        assert key in obs.text
    result = env.step(state, PERFECT_PARIS)
    assert result.reward == pytest.approx(1.0) and result.info["city_correct"]
    assert result.info["geospot"]["resolved"]["city"] == "Paris, Ile-de-France, FR"
    texas = env.step(state, "City: Paris\nRegion: Texas\nCountry: USA")
    assert texas.info["geospot"]["resolved"]["city"] == "Paris, Texas, US"
    assert 0.0 < texas.reward < 0.2  # only the country counts at stage 0: the US is far
    env.curriculum.set_step(99)
    env.step(env.reset(0)[0], "")
    assert env.reset(0)[0].stage == 1 and env.curriculum.state_dict() == {"episodes": 100}
    restored = vlmgym_envs.make("geospot", data_dir=tmp_path)
    restored.curriculum.load_state_dict(env.curriculum.state_dict())
    assert restored.reset(0)[0].stage == 1
    fixed = vlmgym_envs.make("geospot", data_dir=tmp_path, stage=4)
    fixed.curriculum.set_step(0)
    assert fixed.reset(0)[0].stage == 4
    with pytest.raises(ValueError):
        vlmgym_envs.make("geospot", data_dir=tmp_path, stage=5)
    with pytest.raises(TypeError):
        vlmgym_envs.make("geospot", data_dir=tmp_path, curriculum=CurriculumConfig())
    with pytest.raises(TypeError):
        vlmgym_envs.make("geospot", data_dir=tmp_path, reward="v1")


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=200))
def test_geospot_step_never_raises(tmp_path_factory, text):
    if "geospot" not in _ENVS:
        root = tmp_path_factory.mktemp("geospot")
        write_osv5m(root)
        _ENVS["geospot"] = vlmgym_envs.make("geospot", data_dir=root, stage=4)
    env = _ENVS["geospot"]
    result = env.step(env.reset(1)[0], text)
    assert 0.0 <= result.reward <= 1.0


_ENVS: dict = {}


# Training-step metrics ---------------------------------------------------------------------

INFOS = [
    {"distance_km": 10.0, "country_correct": True, "region_correct": True, "city_correct": True},
    {"distance_km": 50.0, "country_correct": True, "region_correct": True, "city_correct": False},
    {"distance_km": 200.0, "country_correct": True, "region_correct": False},
    {"distance_km": None, "country_correct": False, "region_correct": False},
    {"distance_km": 1000.0},
]


def test_geo_step_metrics_hand_computed():
    # Distances sorted: 10, 50, 200, 1000, M (the missing one); numpy's linear percentiles:
    # p50 at rank 0.5 * 4 = 2 -> 200; p90 at rank 3.6 -> 1000 + 0.6 (M - 1000).
    m = geo_step_metrics(INFOS)
    assert m == pytest.approx(
        {
            "geo/within_25km": 1 / 5,
            "geo/within_100km": 2 / 5,
            "geo/within_500km": 3 / 5,
            "geo/distance_p50_km": 200.0,
            "geo/distance_p90_km": 1000.0 + 0.6 * (MAX_DISTANCE_KM - 1000.0),
            "geo/acc_country": 3 / 5,
            "geo/acc_region": 2 / 5,
            "geo/acc_city": 1 / 5,
            "geo/with_coordinates": 4 / 5,
        }
    )
    assert geo_step_metrics([]) == {}


def test_geo_step_metrics_odd_infos():
    odd = [
        None,
        "not a dict",
        {"distance_km": "far", "country_correct": "yes"},
        {"distance_km": float("nan"), "city_correct": 1},
        {"distance_km": True},
        {"distance_km": -5.0},
    ]
    # Distances: 10, 50, 200, 1000 and seven missing (M): p50 at rank 5 -> M.
    m = geo_step_metrics([*INFOS, *odd])
    assert m["geo/within_25km"] == pytest.approx(1 / 11)
    assert m["geo/distance_p50_km"] == pytest.approx(MAX_DISTANCE_KM)
    assert m["geo/acc_country"] == pytest.approx(3 / 11)
    assert m["geo/acc_city"] == pytest.approx(1 / 11)
    assert m["geo/with_coordinates"] == pytest.approx(4 / 11)


def test_env_step_metrics(tmp_path):
    write_osv5m(tmp_path)
    for name in ("osv5m", "geospot"):
        env = vlmgym_envs.make(name, data_dir=tmp_path, stage=0)
        state, _ = env.reset(0)
        infos = [env.step(state, PERFECT_PARIS).info, env.step(state, "no idea").info]
        m = env.step_metrics(infos)
        assert m["geo/within_25km"] == 0.5 and m["geo/acc_city"] == 0.5
        assert m["geo/distance_p50_km"] == pytest.approx(MAX_DISTANCE_KM / 2)


# Aliases -----------------------------------------------------------------------------------


def test_aliases_build_their_targets(tmp_path):
    schema = pa.schema([
        ("identifier", pa.string()), ("sentence", pa.string()),
        ("left_image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("right_image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("label", pa.int64()),
    ])  # fmt: skip
    image = {"bytes": jpeg((200, 0, 0)), "path": "a.png"}
    row = {"identifier": "dev-0", "sentence": "Two dogs.", "left_image": image,
           "right_image": image, "label": 1}  # fmt: skip
    nlvr2_dir = tmp_path / "nlvr2"
    (nlvr2_dir / "data").mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist([row], schema=schema),
        nlvr2_dir / "data" / "validation-00000-of-00001.parquet",
    )
    caption_dir = tmp_path / "caption"
    (caption_dir / "validation").mkdir(parents=True)
    caption_schema = pa.schema([("image", schema.field("left_image").type),
                                ("captions", pa.list_(pa.string()))])  # fmt: skip
    pq.write_table(
        pa.Table.from_pylist([{"image": image, "captions": ["red"]}], schema=caption_schema),
        caption_dir / "validation" / "0000.parquet",
    )
    osv_dir = tmp_path / "osv"
    osv_dir.mkdir()
    write_osv5m(osv_dir)
    for alias, target, data_dir in [
        ("truefalse", "nlvr2", nlvr2_dir),
        ("TrueFalse", "nlvr2", nlvr2_dir),
        ("vision_caption", "caption", caption_dir),
        ("vision", "caption", caption_dir),
        ("geoguessr", "osv5m", osv_dir),
    ]:
        env = vlmgym_envs.make(alias, data_dir=data_dir)
        assert type(env) is type(vlmgym_envs.make(target, data_dir=data_dir)), alias
        assert vlmgym_envs.resolve(alias) is vlmgym_envs.resolve(target)
    assert type(vlmgym_envs.make("geospot", data_dir=osv_dir)).__name__ == "GeospotEnv"
    names = vlmgym_envs.available()
    assert names["nlvr2"] == ["truefalse"]
    assert names["caption"] == ["vision", "vision_caption"]
    assert names["geospot"] == []
