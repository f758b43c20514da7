"""The zoom tool, `shapes_zoom`, `geoguessr_zoom` and `geoguessr_feedback`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import vlmgym_envs
from fixtures.datasets import write_osv5m
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from vlmgym_envs import ToolArgumentError, crop_region, parse_tool_calls
from vlmgym_envs.geoguessr.feedback import GeoFeedbackState, bearing_deg, compass
from vlmgym_envs.shapes_zoom import DOT_COLORS, GREY, ShapesZoomEnv, ground_color, zoom_phrases
from vlmgym_envs.zoom import downscale

# The zoom tool --------------------------------------------------------------------------


def gradient(w: int = 40, h: int = 20) -> Image.Image:
    x = np.arange(w, dtype=np.uint8)[None, :].repeat(h, 0)
    y = np.arange(h, dtype=np.uint8)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1), "RGB")


def test_crop_region_uses_fractions_and_keeps_pixels():
    image = gradient()
    region = crop_region(image, 0.5, 0.5, 1.0, 1.0, min_side=1)
    assert region.size == (20, 10)
    assert region.getpixel((0, 0)) == (20, 10, 0) and region.getpixel((19, 9)) == (39, 19, 0)
    # a small region is enlarged by an integer factor, nearest neighbour
    small = crop_region(image, 0.0, 0.0, 0.1, 0.2, min_side=28)
    assert small.size == (28, 28) and small.getpixel((6, 6)) == (0, 0, 0)
    assert small.getpixel((7, 7)) == (1, 1, 0)
    assert crop_region(image, 0, 0, 1, 1, min_side=1, max_side=10).size == (10, 5)


@pytest.mark.parametrize("box", [(0.5, 0, 0.5, 1), (0.6, 0, 0.4, 1), (0, 0, 1, 0.01)])
def test_crop_region_refuses_empty_inverted_and_thin_regions(box):
    with pytest.raises(ToolArgumentError):
        crop_region(gradient(400, 400), *box)


def test_downscale_is_a_box_mean():
    image = Image.fromarray(np.array([[[0] * 3, [255] * 3], [[100] * 3, [155] * 3]], np.uint8))
    assert downscale(image, 1).getpixel((0, 0)) == (128, 128, 128)
    assert downscale(image, 5) is image


# shapes_zoom ----------------------------------------------------------------------------


def test_shapes_zoom_first_view_is_identical_for_every_answer():
    env = ShapesZoomEnv(size=64)
    inner = env.env
    for xy in [(8, 8), (8 * 17, 8 * 20)]:
        views = [np.asarray(downscale(inner.draw_mark(c, xy), 28)) for c in DOT_COLORS]
        assert all(np.array_equal(v, views[0]) for v in views)
        x, y = xy[0] // 8, xy[1] // 8
        assert (views[0][y : y + 6, x : x + 6] == GREY).all()  # the mark: plain grey
    for color in DOT_COLORS.values():  # every block averages to the grey
        block = (np.asarray(color) + 3 * np.asarray(ground_color(color))) / 4
        assert (block == GREY).all()


def test_shapes_zoom_episode_zooming_reads_the_colour():
    env = vlmgym_envs.make("shapes_zoom", size=64, call_cost=0.05)
    phrases = env.tool_phrases()
    assert phrases == zoom_phrases() and len(phrases) == 5
    for idx in range(12):
        state, obs = env.reset(idx)
        assert obs.images[0].size == (28, 28) and state.images[0].size == (224, 224)
        assert obs.messages[0]["role"] == "system" and "# Tools" in obs.text
        assert "Options: red, green, blue, yellow." in obs.text
        inner = state.inner
        zoomed = env.step(state, phrases[1 + inner.quadrant])
        assert not zoomed.done and zoomed.info["tool_errors"] == {}
        view = np.asarray(zoomed.observation.images[0]).reshape(-1, 3)
        assert zoomed.observation.images[0].size == (112, 112)
        colours = {tuple(int(v) for v in p) for p in np.unique(view, axis=0)}
        assert DOT_COLORS[inner.target] in colours  # the dots are plain to see
        assert not colours & {DOT_COLORS[c] for c in DOT_COLORS if c != inner.target}
        whole = env.step(state, phrases[0])
        assert whole.observation.images[0].size == (224, 224)
        final = env.step(zoomed.state, inner.target)
        assert final.done and final.reward == pytest.approx(1.0 - 0.05)
        assert final.info["correct"] and final.info["tool_calls"] == 1
        assert final.info["turns"] == 2
        wrong = next(c for c in DOT_COLORS if c != inner.target)
        assert env.step(state, wrong).reward == pytest.approx(0.1)  # direct, wrong
    magnified = ShapesZoomEnv(size=4, zoom_min_side=224)
    state, _ = magnified.reset(0)
    big = magnified.step(state, zoom_phrases()[1 + state.inner.quadrant]).observation.images[0]
    assert big.size == (224, 224)
    assert env.chance_reward()["uniform_kind"] == pytest.approx(0.1 + 0.9 / 4)


def test_shapes_zoom_phrases_are_calls_in_qwen_format():
    for phrase in zoom_phrases():
        parsed = parse_tool_calls(phrase)
        assert len(parsed.calls) == 1 and not parsed.errors
        assert parsed.calls[0].name == "zoom" and phrase.startswith("<tool_call>\n{")
        assert phrase.endswith("}\n</tool_call>")


def test_shapes_zoom_metrics_count_tool_use():
    env = ShapesZoomEnv(size=8)
    infos, records = [], []
    for idx in range(4):
        state, _ = env.reset(idx)
        if idx % 2:
            state = env.step(state, zoom_phrases()[0]).state
        result = env.step(state, state.inner.target)
        infos.append(result.info)
        records.append({"info": result.info, "state": {"inner": {"idx": idx}}})
    assert env.step_metrics(infos)["tool/call_rate"] == 0.5
    metrics = env.metrics(records)
    assert metrics["accuracy"] == 1.0 and metrics["tool/turns_per_episode"] == 1.5


def test_shapes_zoom_reports_whether_a_zoom_held_the_mark():
    env = ShapesZoomEnv(size=8, max_calls=3)
    phrases = zoom_phrases()
    for idx in range(4):
        state, _ = env.reset(idx)
        q = state.inner.quadrant
        assert env.step(state, "red").info["saw_mark"] == 0.0  # direct answer
        elsewhere = env.step(state, phrases[1 + (q + 1) % 4]).state
        assert env.step(elsewhere, "red").info["saw_mark"] == 0.0
        for region in (0, 1 + q):  # the whole image, the mark's quadrant
            seen = env.step(elsewhere, phrases[region]).state
            assert env.step(seen, "red").info["saw_mark"] == 1.0
    assert env.step_metrics([env.step(seen, "red").info])["tool/called/saw_mark"] == 1.0
    whole_only = ShapesZoomEnv(size=4, quadrant_phrases=False)
    assert whole_only.tool_phrases() == zoom_phrases(quadrants=False) == phrases[:1]


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=200))
def test_shapes_zoom_never_raises(text):
    env = ShapesZoomEnv(size=4)
    state, _ = env.reset(0)
    for _ in range(4):
        result = env.step(state, text)
        assert math.isfinite(result.reward)
        if result.done:
            break
        state = result.state


def test_tiny_tokenizer_gives_each_phrase_one_token(tmp_path):
    from tokenizers import Tokenizer
    from vlmgym_model.tiny import write_word_tokenizer
    from vlmgym_train.presets import environment_phrases, environment_texts

    env = ShapesZoomEnv(size=16)
    phrases = environment_phrases(env)
    assert phrases == list(zoom_phrases())
    vocab = write_word_tokenizer(tmp_path, environment_texts(env), phrases=phrases)
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for phrase in phrases:
        ids = tokenizer.encode(phrase).ids
        assert ids == [vocab[phrase]]
        assert tokenizer.decode([*ids, vocab["<|im_end|>"]], skip_special_tokens=True) == phrase
    for word in DOT_COLORS:
        assert len(tokenizer.encode(word).ids) == 1
    # Qwen's non-special added tokens survive skip_special_tokens, as in Qwen's tokenizer
    bare = [vocab["<tool_call>"], vocab["red"], vocab["</tool_call>"], vocab["<|im_end|>"]]
    assert tokenizer.decode(bare, skip_special_tokens=True) == "<tool_call> red </tool_call>"
    # every text the episode shows, tool responses included, is covered
    state, obs = env.reset(3)
    result = env.step(state, phrases[2])
    for text in [obs.text, result.observation.text]:
        assert "<unk>" not in tokenizer.encode(text).tokens


# geoguessr_zoom and geoguessr_feedback ----------------------------------------------------

FRANCE = "country: France\nregion: Ile-de-France\ncity: Paris\nlatitude: 48.85\nlongitude: 2.35"
BERLIN = "country: Germany\nlatitude: 52.52\nlongitude: 13.405"


def test_geoguessr_zoom_on_the_fixture(tmp_path):
    write_osv5m(tmp_path)
    env = vlmgym_envs.make("geoguessr_zoom", data_dir=tmp_path, view_side=16, call_cost=0.1)
    plain = vlmgym_envs.make("osv5m", data_dir=tmp_path)
    assert len(env) == len(plain) == 4
    state, obs = env.reset(0)
    assert obs.images[0].size == (16, 12) and state.images[0].size == (32, 24)
    assert "zoom" in obs.text and obs.messages[0]["role"] == "system"
    call = vlmgym_envs.format_tool_call("zoom", {"x0": 0, "y0": 0, "x1": 0.5, "y1": 0.5})
    zoomed = env.step(state, call)
    region = zoomed.observation.images[0]  # 16 x 12 at full resolution, enlarged x3 to 28+
    assert region.size == (48, 36) and zoomed.info["tool_results"][0]["images"] == [[48, 36]]
    full = state.images[0].crop((0, 0, 16, 12)).resize((48, 36), Image.Resampling.NEAREST)
    assert np.array_equal(np.asarray(region), np.asarray(full))
    final = env.step(zoomed.state, FRANCE)
    expected = plain.step(plain.reset(0)[0], FRANCE)
    assert final.done and final.reward == pytest.approx(expected.reward - 0.1)
    assert final.info["country_correct"] and final.info["tool_calls"] == 1
    records = [{"info": final.info, "state": {"inner": {"truth": {"latitude": 48.8566,
               "longitude": 2.3522}}}}]  # fmt: skip
    metrics = env.metrics(records)
    assert metrics["tool/call_rate"] == 1.0 and "geoscore" in " ".join(metrics)


def test_compass_and_bearing():
    assert compass(bearing_deg(0, 0, 10, 0)) == "north"
    assert compass(bearing_deg(0, 0, 0, 10)) == "east"
    assert compass(bearing_deg(0, 0, -10, -10)) == "south-west"
    berlin_paris = bearing_deg(52.52, 13.405, 48.8566, 2.3522)  # initial great-circle bearing
    assert berlin_paris == pytest.approx(246.7, abs=0.1) and compass(berlin_paris) == "south-west"


def test_geoguessr_feedback_turns_and_discount(tmp_path):
    write_osv5m(tmp_path)
    env = vlmgym_envs.make("geoguessr_feedback", data_dir=tmp_path, max_turns=3)
    state, obs = env.reset(0)  # Paris
    assert isinstance(state, GeoFeedbackState) and state.turn == 0
    assert "how far off" in obs.text
    first = env.step(state, BERLIN)
    assert not first.done and first.reward == 0.0 and first.state.turn == 1
    feedback = first.observation.text
    assert "877 km" in feedback and "to the south-west of your guess" in feedback
    assert "The country is wrong" in feedback
    unread = env.step(first.state, "no idea")
    assert not unread.done and "could not read a latitude" in unread.observation.text
    final = env.step(first.state, FRANCE)  # within stop_km: ends at once
    assert final.done and final.info["turns"] == 2
    full = env.step(state, FRANCE).reward
    assert full > 0 and final.reward == pytest.approx(0.8 * full)
    last = env.step(unread.state, BERLIN)  # the third guess is the last
    assert last.done and last.info["turn"] == 2
    assert env.step_metrics([final.info, last.info])["feedback/turns_per_episode"] == 2.5


@settings(max_examples=30, deadline=None)
@given(st.text(max_size=200))
def test_geoguessr_feedback_never_raises(text):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as root:
        write_osv5m(Path(root))
        env = vlmgym_envs.make("geoguessr_feedback", data_dir=root, max_turns=2)
        state, _ = env.reset(1)
        result = env.step(state, text)
        assert math.isfinite(result.reward)
        if not result.done:
            assert math.isfinite(env.step(result.state, text).reward)
