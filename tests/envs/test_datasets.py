"""osv5m, nlvr2 and caption on fixtures written here in each dataset's published layout."""

from __future__ import annotations

import json
import math
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import vlmgym_envs
from fixtures.datasets import OSV_COLUMNS, OSV_ROWS, jpeg, write_osv5m
from hypothesis import given, settings
from hypothesis import strategies as st
from vlmgym_envs import DataError, UnsafeArchiveError, extract_zip
from vlmgym_envs.caption.cider import CiderD, keyword_reward, keywords, tokenize_caption


def test_osv5m_end_to_end(tmp_path):
    write_osv5m(tmp_path, loose=("1000000004",))
    env = vlmgym_envs.make("geoguessr", data_dir=tmp_path, split="test", stage=3)
    assert len(env) == 4
    state, obs = env.reset(0)
    assert state.id == "1000000001" and obs.images[0].size == (32, 24)
    assert "latitude:" in obs.text and "country:" in obs.text
    answer = (
        "country: France\nregion: Île-de-France\ncity: Paris\nlatitude: 48.8566\nlongitude: 2.3522"
    )
    result = env.step(state, answer)
    assert result.reward == pytest.approx(1.0) and result.done
    assert result.info["missing"] == [] and result.info["country_correct"]
    bad = env.step(state, "no idea")
    assert bad.reward == 0.0 and set(bad.info["missing"]) == {
        "country",
        "region",
        "city",
        "latitude",
        "longitude",
    }
    state4, obs4 = env.reset(3)  # the loose, extracted image
    assert state4.truth.country == "JP" and obs4.images[0].getpixel((0, 0))[2] > 200


def test_osv5m_curriculum_stage_fixed_at_reset(tmp_path):
    write_osv5m(tmp_path)
    from vlmgym_envs.geoguessr.reward import CurriculumConfig

    env = vlmgym_envs.make(
        "osv5m", data_dir=tmp_path, curriculum=CurriculumConfig(mode="steps", stage_steps=(1, 2, 3))
    )
    state, _ = env.reset(0)
    assert state.stage == 0
    assert env.step(state, "country: France").reward == 1.0
    assert env.step(state, "country: France").reward == 1.0  # same state, same stage
    assert env.reset(0)[0].stage == 2


def test_osv5m_missing_images_are_skipped_and_counted(tmp_path):
    write_osv5m(tmp_path, skip_image=("1000000002",))
    env = vlmgym_envs.make("osv5m", data_dir=tmp_path)
    assert len(env) == 3 and env.skipped() == {"missing_image": 1}
    with pytest.raises(DataError, match="no image"):
        vlmgym_envs.make("osv5m", data_dir=tmp_path, on_missing_image="error")


def test_osv5m_bad_input(tmp_path):
    with pytest.raises(DataError, match="not found"):
        vlmgym_envs.make("osv5m", data_dir=tmp_path)
    write_osv5m(tmp_path, columns=[c for c in OSV_COLUMNS if c != "city"])
    with pytest.raises(DataError, match="city"):
        vlmgym_envs.make("osv5m", data_dir=tmp_path)
    write_osv5m(tmp_path, rows=[])
    with pytest.raises(DataError, match="no rows"):
        vlmgym_envs.make("osv5m", data_dir=tmp_path)
    write_osv5m(tmp_path)
    with zipfile.ZipFile(tmp_path / "images" / "test" / "00.zip", "w") as zf:
        zf.writestr("1000000001.jpg", b"not a jpeg")
        for rid, *_ in OSV_ROWS[1:]:
            zf.writestr(f"{rid}.jpg", jpeg((1, 2, 3)))
    env = vlmgym_envs.make("osv5m", data_dir=tmp_path)
    with pytest.raises(DataError, match=r"1000000001.*corrupt"):
        env.reset(0)
    assert env.reset(1)[0].id == "1000000002"


def test_osv5m_refuses_escaping_members(tmp_path):
    write_osv5m(tmp_path)
    for name in ("../evil.jpg", "/abs/1000000001.jpg"):
        with zipfile.ZipFile(tmp_path / "images" / "test" / "01.zip", "w") as zf:
            zf.writestr(name, jpeg((0, 0, 0)))
        with pytest.raises(UnsafeArchiveError):
            vlmgym_envs.make("osv5m", data_dir=tmp_path)
        with pytest.raises(UnsafeArchiveError):
            extract_zip(tmp_path / "images" / "test" / "01.zip", tmp_path / "out")
        assert not (tmp_path / "evil.jpg").exists()


def test_extract_zip_inside_destination(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("sub/1.jpg", jpeg((9, 9, 9)))
    out = extract_zip(archive, tmp_path / "data")
    assert (out / "sub" / "1.jpg").is_file()


def test_osv5m_hub_cache(tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "datasets--osv5m--osv5m" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    write_osv5m(snapshot)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert len(vlmgym_envs.make("osv5m")) == 4
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "nothing"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HOME", raising=False)
    with pytest.raises(DataError, match="hub cache"):
        vlmgym_envs.make("osv5m")


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=300))
def test_osv5m_step_never_raises(tmp_path_factory, text):
    env = _cached_osv_env(tmp_path_factory)
    state, _ = env.reset(1)
    result = env.step(state, text)
    assert 0.0 <= result.reward <= 1.0


_ENVS: dict = {}


def _cached_osv_env(factory):
    if "osv" not in _ENVS:
        root = factory.mktemp("osv")
        write_osv5m(root)
        _ENVS["osv"] = vlmgym_envs.make("osv5m", data_dir=root, stage=3)
    return _ENVS["osv"]


# NLVR2 -------------------------------------------------------------------------------------

NLVR2_SCHEMA = pa.schema([
    ("identifier", pa.string()), ("sentence", pa.string()),
    ("left_image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ("right_image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ("label", pa.int64()), ("directory", pa.string()),
])  # fmt: skip


def write_nlvr2(root, split="validation", n=6, corrupt_row=None):
    rows = []
    for i in range(n):
        left = b"garbage" if i == corrupt_row else jpeg((200, 0, 0))
        rows.append({"identifier": f"dev-{i}-0-0", "sentence": f"There are {i} dogs.",
                     "left_image": {"bytes": left, "path": f"{i}-img0.png"},
                     "right_image": {"bytes": jpeg((0, 0, 200)), "path": f"{i}-img1.png"},
                     "label": i % 2, "directory": "1"})  # fmt: skip
    (root / "data").mkdir(parents=True, exist_ok=True)
    half = n // 2
    for k, chunk in enumerate((rows[:half], rows[half:])):
        table = pa.Table.from_pylist(chunk, schema=NLVR2_SCHEMA)
        pq.write_table(table, root / "data" / f"{split}-0000{k}-of-00002.parquet", row_group_size=2)


def test_nlvr2(tmp_path):
    write_nlvr2(tmp_path)
    env = vlmgym_envs.make("nlvr2", data_dir=tmp_path, split="validation")
    assert len(env) == 6
    for idx in range(6):
        state, obs = env.reset(idx)
        assert state.label == (idx % 2 == 0)  # 0 means True
        assert len(obs.images) == 2 and obs.images[0].getpixel((1, 1))[0] > 150
        assert f"There are {idx} dogs." in obs.text
    state, _ = env.reset(0)
    assert env.step(state, "True").reward == 1.0
    assert env.step(state, "no").reward == 0.0
    result = env.step(state, "It might be true or it might be false")
    assert result.reward == 0.0 and result.info["ambiguous"] and env.ambiguous_count == 1
    false_state, _ = env.reset(1)
    assert env.step(false_state, "False.").reward == 1.0


def test_nlvr2_bad_input(tmp_path):
    with pytest.raises(DataError, match="no parquet"):
        vlmgym_envs.make("nlvr2", data_dir=tmp_path)
    write_nlvr2(tmp_path, corrupt_row=2)
    env = vlmgym_envs.make("nlvr2", data_dir=tmp_path)
    with pytest.raises(DataError, match="row 2"):
        env.reset(2)
    table = pa.table({"identifier": ["a"], "sentence": ["s"], "label": [0]})
    pq.write_table(table, tmp_path / "data" / "validation-00000-of-00002.parquet")
    with pytest.raises(DataError, match="left_image"):
        vlmgym_envs.make("nlvr2", data_dir=tmp_path)


def test_nlvr2_load_from_disk_needs_datasets(tmp_path):
    (tmp_path / "dataset_dict.json").write_text("{}")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="datasets"):
            vlmgym_envs.make("nlvr2", data_dir=tmp_path)
    else:
        pytest.skip("datasets is installed; this checks the error without it")


# CIDEr-D and captions ----------------------------------------------------------------------


def test_cider_d_hand_computed():
    # Two images. Image A refs: "a cat", image B refs: "a dog". N = 2, so idf(w) = log(2/df).
    cider = CiderD([["a cat"], ["a dog"]])
    # Hypothesis "a cat" for A: 1-grams: "a" has df 2 (idf 0), "cat" df 1 (idf log 2);
    # the vectors of hyp and ref are equal, so each n-gram order with a nonzero norm gives
    # cosine 1: n=1 -> 1, n=2 ("a cat", df 1) -> 1, n=3, 4 -> empty, 0.
    assert cider.score("a cat", ["a cat"]) == pytest.approx(10 * (1 + 1 + 0 + 0) / 4)
    # "a dog" against A's refs shares only "a", whose idf is 0.
    assert cider.score("a dog", ["a cat"]) == pytest.approx(0.0)
    # Length penalty: "cat cat cat cat cat cat cat cat a" vs "a cat": 1-gram "cat" tf 8 vs 1.
    hyp = "cat " * 8 + "a"
    words = 9
    delta = (words - 1) - 1
    idf = math.log(2)
    v_h, v_r = 8 * idf, idf
    cos1 = min(v_h, v_r) * v_r / (v_h * v_r)  # clipped: 1/8
    # bigrams of hyp: "cat cat" (tf 7, df 0 -> idf log 2) and "cat a" (df 0); ref: "a cat".
    expected = 10 * (cos1 * math.exp(-(delta**2) / 72)) / 4
    assert cider.score(hyp, ["a cat"]) == pytest.approx(expected)
    assert cider.score("", ["a cat"]) == 0.0


def test_cider_d_matches_pycocoevalcap():
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    refs = [
        [
            "a man riding a horse on a beach",
            "a person rides a horse near the sea",
            "horse and rider on sand",
        ],
        ["two dogs playing with a ball", "dogs play in the grass with a red ball"],
        ["a plate of food with broccoli", "broccoli and rice on a white plate", "a healthy meal"],
        ["a red bus driving down the street", "a double decker bus on a city road"],
    ]
    hyps = ["a man rides a horse on the beach", "a dog with a ball", "broccoli on a plate", "a bus"]
    ours = CiderD(refs)
    scorer = CiderScorer(n=4, sigma=6.0)
    for h, r in zip(hyps, refs, strict=True):
        scorer += (" ".join(tokenize_caption(h)), [" ".join(tokenize_caption(x)) for x in r])
    _, theirs = scorer.compute_score()
    assert [ours.score(h, r) for h, r in zip(hyps, refs, strict=True)] == pytest.approx(
        list(theirs), abs=1e-9
    )


def test_keyword_reward():
    refs = ["A black cat sits on a sofa.", "A cat on a black couch.", "The sofa has a cat."]
    assert keywords(refs) == {"black", "cat", "sofa"}
    assert keyword_reward("black cat on a sofa", refs) == pytest.approx(1.0)
    assert keyword_reward("a cat", refs) == pytest.approx(2 * (1 * 1 / 3) / (1 + 1 / 3))
    assert keyword_reward("cat black sofa dog tree car", refs) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert keyword_reward("", refs) == 0.0


def test_caption_coco(tmp_path):
    images = tmp_path / "val2017"
    images.mkdir()
    for i in (1, 2, 3):
        (images / f"{i:012d}.jpg").write_bytes(jpeg((i * 50, 0, 0)))
    coco = {
        "images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (1, 2, 3, 4)],
        "annotations": [
            {"image_id": 1, "id": 10, "caption": "A red square on white."},
            {"image_id": 1, "id": 11, "caption": "a red block"},
            {"image_id": 2, "id": 12, "caption": "A dark red picture."},
            {"image_id": 4, "id": 13, "caption": "No file for this one."},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    env = vlmgym_envs.make("vision", annotations=tmp_path / "captions.json", image_dir=images)
    assert len(env) == 2 and env.skipped() == {"no_caption": 1, "missing_image": 1}
    state, obs = env.reset(0)
    assert obs.images[0].size == (32, 24)
    good = env.step(state, "a red square on white").reward
    assert good > env.step(state, "a dog").reward >= 0.0
    assert good == pytest.approx(env.cider.score("a red square on white", state.references))
    kw = vlmgym_envs.make(
        "caption", annotations=tmp_path / "captions.json", image_dir=images, reward="keyword"
    )
    assert kw.step(kw.reset(0)[0], "red").reward == pytest.approx(1.0)
    coco["images"][0]["file_name"] = "../escape.jpg"
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    with pytest.raises(UnsafeArchiveError):
        vlmgym_envs.make("caption", annotations=tmp_path / "captions.json", image_dir=images)


def test_caption_parquet(tmp_path):
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("captions", pa.list_(pa.string()))])  # fmt: skip
    green = {"bytes": jpeg((0, 255, 0)), "path": "a.jpg"}
    blue = {"bytes": jpeg((0, 0, 255)), "path": "b.jpg"}
    rows = [{"image": green, "captions": ["a green image", "green"]},
            {"image": blue, "captions": []}]  # fmt: skip
    (tmp_path / "validation").mkdir()
    pq.write_table(
        pa.Table.from_pylist(rows, schema=schema), tmp_path / "validation" / "0000.parquet"
    )
    env = vlmgym_envs.make("caption", data_dir=tmp_path)
    assert len(env) == 1 and env.skipped() == {"no_caption": 1}
    state, obs = env.reset(0)
    assert obs.images[0].getpixel((2, 2))[1] > 200
    # One image in the corpus: every idf is log(1/1) = 0, so CIDEr-D is 0 (as in coco-caption).
    assert env.step(state, "a green image").reward == 0.0
    with pytest.raises(DataError, match="captions"):
        vlmgym_envs.make("caption", data_dir=tmp_path, captions_column="nope")


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.text(max_size=400), st.just("word " * 5000)))
def test_caption_rewards_never_raise(text):
    cider = CiderD([["a cat on a mat", "cat"], ["a dog"]])
    assert cider.score(text, ["a cat on a mat", "cat"]) >= 0.0
    assert 0.0 <= keyword_reward(text, ["a cat on a mat", "cat"]) <= 1.0
