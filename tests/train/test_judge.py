"""The model judge: its prompts, verdict parsing and batching (tiny random models test the
plumbing, not the judgement)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import jax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vlmgym_train.judge import ModelJudge, parse_score

SCORES = [
    ("Score: 7", 0.7),
    ("score = 7/10", 0.7),
    ("**Score:** 10", 1.0),
    ("I'd give it [[3]].", 0.3),
    ("8 out of 10, solid", 0.8),
    ("Reasoning...\n4\n", 0.4),
    ("Score: 12", 1.0),  # clipped
    ("Score: -2", 0.0),
    ("3/5", 0.6),  # the fraction's own denominator
    ("Score: 4/0", None),
    ("no number here", None),
    ("", None),
]


@pytest.mark.parametrize(("verdict", "want"), SCORES)
def test_parse_score(verdict, want):
    got = parse_score(verdict, 10)
    assert got == (None if want is None else pytest.approx(want))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_parse_score_never_raises(text):
    got = parse_score(text, 10)
    assert got is None or 0.0 <= got <= 1.0


def test_the_judge_batches_prompts_and_counts_what_it_cannot_read(tiny_model_dir):
    judge = ModelJudge(tiny_model_dir, rubric="Is it a colour?", dtype="float32",
                       max_new_tokens=4, device=jax.devices()[0])  # fmt: skip
    prompts = judge.prompts(["red", "blue"], question=["Name a colour.", "?"], answer=["red", 1])
    assert len(prompts) == 2 and "Rubric: Is it a colour?" in prompts[0][0]["content"]
    assert "Question:\nName a colour." in prompts[0][0]["content"]
    assert "Reference answer:\nred" in prompts[0][0]["content"]
    # scored from a worker thread, as the trainer scores rewards
    with ThreadPoolExecutor(1) as pool:
        rewards = pool.submit(judge, ["red", "blue", "green"], question=["q"] * 3).result()
    assert len(rewards) == 3 and all(0.0 <= r <= 1.0 for r in rewards)
    assert judge.calls == 1 and judge.judged == 3  # one batched generation
    # a random model's verdicts are seldom scores: those count as 0 and as unparsed
    assert judge.unparsed <= sum(r == 0.0 for r in rewards)
    judge.verdicts = lambda completions, **_: ["Score: 9", "garbage"][: len(completions)]
    assert judge(["a", "b"]) == [pytest.approx(0.9), 0.0]


def test_judge_settings_are_checked(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="rubric"):
        ModelJudge(tiny_model_dir, rubric=" ")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        ModelJudge(tmp_path, rubric="x")
    with pytest.raises(ValueError, match="scale"):
        ModelJudge(tiny_model_dir, rubric="x", scale=0)


def test_a_dataset_env_names_the_judge_from_json(tiny_model_dir, tmp_path):
    """`--env_kwargs '{"reward": {"judge": {...}, "exact": 0.5}}'`: the judge is built from
    its options by name, beside a library reward, and scores with it."""
    import json

    from fixtures.datasets import write_shapes_parquet
    from vlmgym_envs import make
    from vlmgym_envs.rewards import resolve_reward

    options = {"model_dir": str(tiny_model_dir), "rubric": "Is it the right colour?",
               "dtype": "float32", "max_new_tokens": 2, "weight": 2.0}  # fmt: skip
    data = write_shapes_parquet(tmp_path / "shapes.parquet", rows=4)
    env = make("dataset", path=str(data), image_column="image", prompt="{question}",
               reward=json.dumps({"judge": options, "exact": 0.5}))  # fmt: skip
    state, _ = env.reset(0)
    results = env.step_many([state, state], ["red", "blue"])
    assert [sorted(r.info["reward_parts"]) for r in results] == [["exact", "judge"]] * 2
    for r in results:
        parts = r.info["reward_parts"]
        assert r.reward == pytest.approx(2.0 * parts["judge"] + 0.5 * parts["exact"])
    combined = resolve_reward({"judge": options, "exact": 0.5})
    assert len(combined(["red"], answer=["red"])) == 1
    with pytest.raises(ValueError, match="no reward factory"):
        resolve_reward({"jduge": options})
