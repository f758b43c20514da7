"""The standard tasks (geometry3k, clevr_count, mathvista) on fixtures in their published
hub layouts: read from a fake hub cache and from a local copy, scored with the rewards
library (when it is there) and with stand-in rewards that show what each reward is given."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import vlmgym_envs
from fixtures.datasets import (
    GEOMETRY3K_ROWS,
    hub_snapshot,
    save_parquet_split_to_disk,
    write_clevr_count,
    write_geometry3k,
    write_mathvista,
)
from vlmgym_envs import DataError
from vlmgym_envs.tasks import (
    CLEVR_COUNT_HUB,
    GEOMETRY3K_HUB,
    MATHVISTA_HUB,
    ClevrCountEnv,
    Geometry3KEnv,
    MathVistaEnv,
    MathVistaReward,
)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake hub cache with the three datasets' splits; HF_HUB_CACHE points at it."""
    cache = tmp_path / "hub"
    for split in ("train", "test"):
        write_geometry3k(hub_snapshot(cache, GEOMETRY3K_HUB), split)
    write_clevr_count(hub_snapshot(cache, CLEVR_COUNT_HUB))
    write_mathvista(hub_snapshot(cache, MATHVISTA_HUB))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def gold(completions, answer, **_):
    return [float(c == a) for c, a in zip(completions, answer, strict=True)]


def content(obs):
    return [p["type"] if p["type"] == "image" else p["text"] for p in obs.messages[-1]["content"]]


def test_geometry3k_reads_the_hub_cache_and_a_local_copy(hub, tmp_path):
    env = vlmgym_envs.make("geometry3k", reward=gold)
    assert isinstance(env, Geometry3KEnv) and len(env) == 3
    state, obs = env.reset(0)
    parts = content(obs)
    assert parts[0] == "image" and len(parts) == 2  # the diagram at the problem's <image>
    assert parts[1].startswith("Find x. Assume") and "\\boxed{}" in parts[1]
    assert obs.images[0].getpixel((0, 0)) == GEOMETRY3K_ROWS[0][-1]
    result = env.step(state, "3\\sqrt{3}")
    assert result.reward == 1.0 and result.info["answer"] == "3\\sqrt{3}"
    snapshot = next(
        (hub / f"datasets--{GEOMETRY3K_HUB.replace('/', '--')}" / "snapshots").iterdir()
    )
    local = save_parquet_split_to_disk(snapshot, tmp_path / "geo3k", "test")
    copy = vlmgym_envs.make("geometry3k", path=str(local), split="test", reward=gold)
    assert [content(copy.reset(i)[1]) for i in range(3)] == [
        content(env.reset(i)[1]) for i in range(3)
    ]
    with pytest.raises(
        DataError, match="geometry3k split 'validation' is not in the Hugging Face hub cache"
    ):
        Geometry3KEnv(split="validation", reward=gold)


def test_clevr_count_derives_the_gold_count(hub, tmp_path):
    env = vlmgym_envs.make("clevr_count", reward=gold)
    assert isinstance(env, ClevrCountEnv)
    answers = [env.step(env.reset(i)[0], "").info["answer"] for i in range(len(env))]
    assert answers == ["3", "5", "10"]
    obs = env.reset(0)[1]
    assert content(obs)[0] == "image" and content(obs)[1].startswith(
        "How many items are there in the image? Output the thinking process in <think>"
    )
    assert env.step(env.reset(1)[0], "5").reward == 1.0
    snapshot = next((hub / f"datasets--{CLEVR_COUNT_HUB.replace('/', '--')}").rglob("data"))
    table = pq.read_table(next(snapshot.glob("*.parquet"))).drop_columns(["solution"])
    pq.write_table(table, tmp_path / "no_solution.parquet")
    with pytest.raises(DataError, match="has no column 'solution' \\(read by derived column"):
        ClevrCountEnv(tmp_path / "no_solution.parquet", reward=gold)


class Stub:
    """A stand-in reward recording what it is given; scores 1 for its `answer`."""

    def __init__(self):
        self.calls = []

    def __call__(self, completions, answer, **columns):
        self.calls.append((list(completions), list(answer), columns))
        return [float(c == a) for c, a in zip(completions, answer, strict=True)]


def test_mathvista_scores_each_row_by_its_type(hub):
    choice, numeric, exact = Stub(), Stub(), Stub()
    reward = MathVistaReward(choice=choice, numeric=numeric, exact=exact)
    env = vlmgym_envs.make("mathvista", reward=reward)
    assert isinstance(env, MathVistaEnv) and len(env) == 5
    obs = env.reset(0)[1]
    assert content(obs)[0] == "image" and content(obs)[1].endswith("(C) 60°\n(D) 90°")
    states = [env.reset(i)[0] for i in range(5)]
    results = env.step_many(states, ["C", "3", "1.4", "[2, 7]", "A"])
    assert [r.reward for r in results] == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert choice.calls == [(["C", "A"], ["C", "B"], {"choices": [
        ["30°", "45°", "60°", "90°"], ["Yes", "No"]]})]  # fmt: skip
    assert numeric.calls == [(["3", "1.4"], ["3", "1.5"], {"precision": [None, 1.0]})]
    assert exact.calls == [(["[2, 7]"], ["[2, 7]"], {})]
    infos = [r.info for r in results]
    assert [i["question_type"] for i in infos] == [
        "multi_choice",
        *["free_form"] * 3,
        "multi_choice",
    ]
    metrics = env.metrics([{"info": i, "reward": 0.0} for i in infos])
    assert metrics["accuracy"] == pytest.approx(0.6)
    assert metrics["accuracy/multi_choice"] == 0.5
    assert metrics["accuracy/free_form"] == pytest.approx(2 / 3)
    only = MathVistaEnv(reward=reward, multi_choice_only=True)
    assert len(only) == 2 and all(only.reset(i)[0].row in (0, 4) for i in range(2))


def test_mathvista_answer_outside_the_choices_is_skipped(tmp_path):
    from fixtures.datasets import MATHVISTA_ROWS

    bad = ("Which?", ["A thing", "B thing"], "C thing", "multi_choice", "text", None, "Hint:")
    write_mathvista(tmp_path, rows=[*MATHVISTA_ROWS, bad])
    env = MathVistaEnv(tmp_path, reward=MathVistaReward(Stub(), Stub(), Stub()))
    assert len(env) == 5 and env.skipped() == {"answer_not_in_choices": 1}


# With the rewards library ------------------------------------------------------------------


@pytest.fixture
def rewards_library():
    module = pytest.importorskip("vlmgym_envs.rewards", reason="the rewards library has not landed")
    if not hasattr(module, "resolve_reward"):
        pytest.skip("the rewards library has not landed (no resolve_reward)")
    return module


def test_standard_tasks_score_right_and_wrong_answers(hub, rewards_library):
    geometry = vlmgym_envs.make("geometry3k")
    state = geometry.reset(1)[0]  # answer 60
    assert geometry.step(state, "<think>Angles add up.</think> \\boxed{60}").info["correct"]
    assert geometry.step(state, "<think>Guess.</think> \\boxed{45}").reward == 0.0
    combined = vlmgym_envs.make("geometry3k", reward='{"math": 1.0, "boxed_format": 0.1}')
    result = combined.step(state, "<think>Angles add up.</think> \\boxed{60}")
    assert result.reward == pytest.approx(1.1) and result.info["correct"]
    assert result.info["reward_parts"] == {"math": 1.0, "boxed_format": 1.0}
    clevr = vlmgym_envs.make("clevr_count")
    state = clevr.reset(0)[0]  # 3 items
    assert clevr.step(state, "<think>I count them.</think><answer>3</answer>").reward == 1.0
    assert clevr.step(state, "<think>I count them.</think><answer>4</answer>").reward == 0.0
    mathvista = vlmgym_envs.make("mathvista")
    states = [mathvista.reset(i)[0] for i in range(5)]
    right = mathvista.step_many(
        states, ["Answer: C", "Answer: 3", "Answer: 1.5", "Answer: [2, 7]", "Answer: B"]
    )
    wrong = mathvista.step_many(
        states, ["Answer: A", "Answer: 4", "Answer: 2.5", "Answer: [2, 8]", "Answer: A"]
    )
    assert [r.info["correct"] for r in right] == [True] * 5
    assert [r.reward for r in wrong] == [0.0] * 5
    assert not any("reward_error" in r.info for r in right + wrong)
    slope = states[2]  # 1.5, given to one decimal place
    rewards = [mathvista.step(slope, f"Answer: {x}").reward for x in ("1.54", "1.46", "1.4")]
    assert rewards == [1.0, 1.0, 0.0]
