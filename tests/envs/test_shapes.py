"""The shapes world: determinism, answers, reward values and chance levels."""

from __future__ import annotations

import numpy as np
import pytest
import vlmgym_envs
from hypothesis import given, settings
from hypothesis import strategies as st
from vlmgym_envs.shapes import (
    ANSWER_VOCAB,
    COLORS,
    KINDS,
    ShapesConfig,
    ShapesEnv,
    answer_vocabulary,
)


def test_vocabulary_is_fixed_single_words():
    assert answer_vocabulary() == ANSWER_VOCAB
    assert len(ANSWER_VOCAB) == 20 == len(set(ANSWER_VOCAB))
    assert all(w.isalpha() and w.islower() for w in ANSWER_VOCAB)


def test_default_is_easy_colour_question():
    env = vlmgym_envs.make("shapes")
    state, obs = env.reset(3)
    assert state.kind == "color"
    assert state.target in ("red", "green", "blue", "yellow")
    [message] = obs.messages
    assert message["role"] == "user"
    assert [p["type"] for p in message["content"]] == ["image", "text"]
    assert obs.images[0].size == (56, 56)
    assert "Options: red, green, blue, yellow." in obs.text


def test_image_shows_the_target_colour():
    env = ShapesEnv()
    for idx in range(20):
        state, obs = env.reset(idx)
        pixels = np.asarray(obs.images[0]).reshape(-1, 3)
        colours = {tuple(p) for p in pixels}
        assert COLORS[state.target] in colours
        for other, rgb in COLORS.items():
            if other != state.target:
                assert rgb not in colours


def test_deterministic_per_seed_and_idx():
    a, b = ShapesEnv(preset="hard"), ShapesEnv(preset="hard")
    for idx in (0, 7, 123):
        (sa, oa), (sb, ob) = a.reset(idx), b.reset(idx)
        assert sa == sb
        assert [im.tobytes() for im in oa.images] == [im.tobytes() for im in ob.images]
    c = ShapesEnv(preset="hard", seed=1)
    assert any(
        c.reset(i)[1].images[0].tobytes() != a.reset(i)[1].images[0].tobytes() for i in range(5)
    )


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_a_valid_target(kind):
    env = ShapesEnv(preset="hard", kinds=(kind,), size=50)
    for idx in range(50):
        state, obs = env.reset(idx)
        assert state.target in env.config.answers(kind)
        assert len(obs.images) == (2 if kind == "pair" else 1)
        assert obs.images[0].size == (112, 112)


def test_count_matches_number_of_drawn_shapes():
    from scipy import ndimage

    env = ShapesEnv(kinds=("count",), min_shapes=1, max_shapes=5, colors=tuple(COLORS))
    seen = set()
    for idx in range(40):
        state, obs = env.reset(idx)
        mask = (np.asarray(obs.images[0]) != 240).any(axis=2)
        _, components = ndimage.label(mask)
        assert ("one", "two", "three", "four", "five")[components - 1] == state.target
        seen.add(state.target)
    assert len(seen) == 5


def test_reward_values():
    env = ShapesEnv()
    state, _ = env.reset(0)
    wrong = next(w for w in env.config.colors if w != state.target)
    assert env.step(state, state.target).reward == pytest.approx(1.0)
    assert env.step(state, f" **{state.target.upper()}.** ").reward == pytest.approx(1.0)
    assert env.step(state, f"I think it is {state.target}").reward == pytest.approx(0.9)
    assert env.step(state, wrong).reward == pytest.approx(0.1)
    assert env.step(state, "banana").reward == 0.0
    result = env.step(state, f"{state.target} or {wrong}")
    assert result.reward == 0.0 and result.info["parse_error"].startswith("several")
    assert result.done and result.observation is None


def test_chance_levels_match_enumeration():
    for preset in ("easy", "medium", "hard"):
        env = ShapesEnv(preset=preset, size=200)
        chance = env.chance_reward()
        states = [env.reset(i)[0] for i in range(200)]
        vocab_mean = np.mean([env.step(s, w).reward for s in states for w in ANSWER_VOCAB])
        assert vocab_mean == pytest.approx(chance["uniform_vocab"])
        assert chance["uniform_vocab"] == pytest.approx(0.1 + 0.9 / 20)
    easy = ShapesEnv().chance_reward()
    assert easy["uniform_kind"] == pytest.approx(0.1 + 0.9 / 4)


def test_multi_turn_retry():
    env = ShapesEnv(max_turns=2)
    state, _ = env.reset(0)
    wrong = next(w for w in env.config.colors if w != state.target)
    first = env.step(state, wrong)
    assert not first.done and first.reward == 0.0
    assert first.state is not None and first.state.turn == 1
    assert "try again" in first.observation.text
    second = env.step(first.state, state.target)
    assert second.done and second.reward == pytest.approx(0.5)
    # Stepping the first state again is independent (states are values).
    assert env.step(state, state.target).reward == pytest.approx(1.0)


def test_config_validation():
    with pytest.raises(ValueError):
        ShapesConfig(kinds=("colour",))
    with pytest.raises(ValueError):
        ShapesConfig(max_shapes=6)
    with pytest.raises(ValueError):
        ShapesConfig.preset("impossible")
    with pytest.raises(IndexError):
        ShapesEnv(size=3).reset(3)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_step_never_raises(text):
    env = ShapesEnv(preset="medium")
    state, _ = env.reset(1)
    result = env.step(state, text)
    assert 0.0 <= result.reward <= 1.0
