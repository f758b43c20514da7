"""DatasetEnv: every table form gives the same tasks; images, prompts, messages; rewards
called TRL-style; bad data skipped and counted, never a crash."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import vlmgym_envs
from fixtures.datasets import IMAGE_STRUCT, hub_snapshot, png
from hypothesis import given, settings
from hypothesis import strategies as st
from vlmgym_envs import DataError, DatasetEnv, SkipTask
from vlmgym_envs.dataset_prompt import PromptTemplate

ROWS = [
    ("How many red squares are there?", "2", (200, 0, 0)),
    ("What is 1/2 + 1/4?", "\\frac{3}{4}", (0, 200, 0)),
    ("Name the shape.", "circle", (0, 0, 200)),
]
PROMPT = "Question: {problem}\nAnswer briefly."


def exact(completions, answer, **_):
    return [float(c.strip() == a) for c, a in zip(completions, answer, strict=True)]


def toy_table(rows=ROWS):
    return pa.table({
        "image": pa.array([{"bytes": png(c), "path": None} for *_, c in rows], IMAGE_STRUCT),
        "problem": [p for p, *_ in rows], "answer": [a for _, a, _ in rows],
    })  # fmt: skip


def write_records(root, kind):
    (root / "images").mkdir(parents=True)
    records = []
    for i, (problem, answer, color) in enumerate(ROWS):
        (root / "images" / f"{i}.png").write_bytes(png(color))
        records.append({"image": f"images/{i}.png", "problem": problem, "answer": answer})
    if kind == "jsonl":
        lines = [json.dumps(r) for r in records]
        (root / "train.jsonl").write_text("\n".join([lines[0], "not json", *lines[1:]]) + "\n")
        return
    with (root / "train.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same three rows in every form DatasetEnv reads: name -> (path, split)."""
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("sources")
    features = datasets.Features({"image": datasets.Image(), "problem": datasets.Value("string"),
                                  "answer": datasets.Value("string")})  # fmt: skip
    data = datasets.Dataset.from_dict(toy_table().to_pydict(), features=features)
    data.save_to_disk(str(root / "disk_split"))
    datasets.DatasetDict({"train": data, "test": data.select([0])}).save_to_disk(str(root / "disk"))
    (root / "parquet" / "data").mkdir(parents=True)
    pq.write_table(toy_table(), root / "parquet" / "data" / "train-00000-of-00001.parquet",
                   row_group_size=2)  # fmt: skip
    for kind in ("jsonl", "csv"):
        write_records(root / kind, kind)
    snapshot = hub_snapshot(root / "hub", "someone/toy")
    pq.write_table(toy_table(), snapshot / "train.parquet")
    return {
        "dataset": (data, None),
        "dataset_dict": (datasets.DatasetDict({"train": data, "test": data}), "train"),
        "save_to_disk": (root / "disk", "train"),
        "save_to_disk_split": (root / "disk_split", None),
        "parquet_folder": (root / "parquet", "train"),
        "parquet_file": (root / "parquet" / "data" / "train-00000-of-00001.parquet", None),
        "parquet_glob": (str(root / "parquet" / "*" / "*.parquet"), None),
        "jsonl": (root / "jsonl", "train"),
        "csv_file": (root / "csv" / "train.csv", None),
        "hub_cache": ("someone/toy", "train"),
        "_hub": (root / "hub", None),
    }


def observations(env):
    return [
        (obs.text, [image.tobytes() for image in obs.images], obs.messages[0]["content"][0]["type"])
        for obs in (env.reset(i)[1] for i in range(len(env)))
    ]


@pytest.mark.parametrize("form", ["dataset", "dataset_dict", "save_to_disk", "save_to_disk_split",
                                  "parquet_folder", "parquet_file", "parquet_glob", "jsonl",
                                  "csv_file", "hub_cache"])  # fmt: skip
def test_every_source_gives_the_same_tasks(sources, form, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(sources["_hub"][0]))
    path, split = sources[form]
    env = DatasetEnv(path, split, image_column="image", prompt=PROMPT, reward=exact)
    expected = [(PROMPT.format(problem=p), [_pixels(c)], "image") for p, _, c in ROWS]
    assert observations(env) == expected
    image_cells_in_memory = form in ("jsonl", "csv_file")  # file paths, not image bytes
    assert ("image" in env.table.columns) == image_cells_in_memory
    assert env.step(env.reset(1)[0], "\\frac{3}{4}").info == {
        "correct": True,
        "answer": "\\frac{3}{4}",
        "format_ok": False,  # right, but not a marked final answer
    }
    assert env.step(env.reset(1)[0], "\\boxed{0.75}").info["format_ok"] is True
    assert env.skipped() == ({"malformed_row": 1} if form == "jsonl" else {})


def _pixels(color):
    from PIL import Image

    return Image.new("RGB", (8, 6), color).tobytes()


def test_source_errors(sources, tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"splits \['train', 'test'\]; pass split="):
        DatasetEnv(sources["save_to_disk"][0], image_column="image", prompt=PROMPT, reward=exact)
    with pytest.raises(DataError, match="no parquet, JSON Lines or CSV files of split 'dev'"):
        DatasetEnv(sources["parquet_folder"][0], "dev", prompt=PROMPT, reward=exact)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HOME", raising=False)
    with pytest.raises(DataError, match="not in the Hugging Face hub cache") as info:
        DatasetEnv("someone/absent", "train", prompt=PROMPT, reward=exact)
    assert "download=True" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DataError, match="does not exist"):
        DatasetEnv(tmp_path / "nothing" / "here", prompt=PROMPT, reward=exact)


def test_missing_columns_are_one_line_errors(sources):
    path, split = sources["parquet_folder"]
    cases = [({"image_column": "picture", "prompt": PROMPT}, "'picture' \\(the image_column\\)"),
             ({"prompt": "{question}"}, "'question' \\(the prompt field \\{question\\}\\)"),
             ({"messages_column": "messages"}, "'messages' \\(the messages_column\\)"),
             ({"prompt": PROMPT, "answer_column": "gold"}, "'gold'"),
             ({"prompt": "{image}"}, "binary data")]  # fmt: skip
    for kwargs, message in cases:
        with pytest.raises(DataError, match=message) as info:
            DatasetEnv(path, split, reward=exact, **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(DataError, match=r"columns: \['image', 'problem', 'answer'\]"):
        DatasetEnv(path, split, image_column="picture", prompt=PROMPT, reward=exact)


def test_prompt_template_is_safe():
    assert (
        PromptTemplate("{{x}} {problem}: {answer}").render({"problem": "p", "answer": [1, "b"]})
        == "{x} p: 1, b"
    )
    for bad in ["{problem.__class__}", "{problem[0]}", "{0}", "{}", "{problem!r}",
                "{problem:>99999}", "{problem", "x}"]:  # fmt: skip
        with pytest.raises(ValueError, match="prompt template"):
            PromptTemplate(bad)


# Image cells and where they go -------------------------------------------------------------


def write_cells(root):
    (root / "img").mkdir()
    (root / "img" / "b.png").write_bytes(png((0, 0, 255)))
    red, green = png((255, 0, 0)), png((0, 255, 0))
    table = pa.table({
        "struct": pa.array([{"bytes": red, "path": "x.png"}], IMAGE_STRUCT),
        "path_struct": pa.array([{"bytes": None, "path": "img/b.png"}], IMAGE_STRUCT),
        "list": pa.array([[{"bytes": red, "path": None}, {"bytes": green, "path": None}]],
                         pa.list_(IMAGE_STRUCT)),
        "path": ["img/b.png"], "paths": [["img/b.png", "img/b.png"]], "raw": pa.array([green]),
        "empty": pa.array([[]], pa.list_(IMAGE_STRUCT)), "none": pa.array([None], IMAGE_STRUCT),
        "text": ["Compare <image> with <image>."], "lead": ["<image>Find x."],
    })  # fmt: skip
    pq.write_table(table, root / "cells.parquet")
    return root / "cells.parquet"


def colors(obs):
    return [image.getpixel((0, 0)) for image in obs.images]


def test_image_cell_forms(tmp_path):
    path = write_cells(tmp_path)
    red, green, blue = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    expected = {"struct": [red], "path_struct": [blue], "list": [red, green], "path": [blue],
                "paths": [blue, blue], "raw": [green], "empty": [], "none": [],
                ("raw", "list", "path"): [green, red, green, blue]}  # fmt: skip
    for column, want in expected.items():
        image_column = list(column) if isinstance(column, tuple) else column
        env = DatasetEnv(path, image_column=image_column, prompt="Look.", reward=exact)
        assert colors(env.reset(0)[1]) == want, column
    text_only = DatasetEnv(path, prompt="Look.", reward=exact).reset(0)[1]
    assert text_only.messages == [{"role": "user", "content": [{"type": "text", "text": "Look."}]}]


def kinds(obs):
    return [part["type"] if part["type"] == "image" else part["text"]
            for part in obs.messages[-1]["content"]]  # fmt: skip


def test_image_marker_placement(tmp_path):
    path = write_cells(tmp_path)

    def obs(image_column, prompt, **kwargs):
        env = DatasetEnv(path, image_column=image_column, prompt=prompt, reward=exact, **kwargs)
        return env.reset(0)[1]

    assert kinds(obs("list", "{text}")) == ["Compare ", "image", " with ", "image", "."]
    assert kinds(obs("list", "{lead} Think.")) == ["image", "image", "Find x. Think."]
    assert kinds(obs("struct", "{text}")) == ["Compare ", "image", " with ", "."]
    assert kinds(obs("list", "Say {text}")) == ["Say Compare ", "image", " with ", "image", "."]
    assert kinds(obs("struct", "Look.")) == ["image", "Look."]  # Qwen: images first
    assert kinds(obs("struct", "{lead}", image_marker=None)) == ["image", "<image>Find x."]
    system = obs("struct", "{lead}", system_prompt="Be brief.").messages[0]
    assert system == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}


def test_messages_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": "Old system."}]},
        {"role": "user", "content": [{"type": "text", "text": "What colour?"},
                                     {"type": "image", "text": None}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]  # fmt: skip
    sharegpt = [
        {"from": "human", "value": "<image>\nWhat colour?"},
        {"from": "gpt", "value": "red"},
    ]
    data = datasets.Dataset.from_dict({
        "messages": [conversation, conversation], "image": [png((255, 0, 0)), png((0, 9, 0))],
        "answer": ["red", "green"],
    })  # fmt: skip
    env = DatasetEnv(data, messages_column="messages", image_column="image", reward=exact)
    obs = env.reset(0)[1]
    assert [m["role"] for m in obs.messages] == ["system", "user"]  # the reference reply dropped
    assert kinds(obs) == ["What colour?", "image"] and colors(obs) == [(255, 0, 0)]
    env = DatasetEnv(data, messages_column="messages", image_column="image", reward=exact,
                     system_prompt="New system.")  # fmt: skip
    assert env.reset(1)[1].messages[0]["content"][0]["text"] == "New system."
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(row) for row in [
        {"conversations": sharegpt, "image": None, "answer": "red"},
        {"conversations": "not a conversation", "image": None, "answer": "red"},
        {"conversations": [{"role": "assistant", "content": "hi"}], "image": None, "answer": "x"},
    ]))  # fmt: skip
    env = DatasetEnv(tmp_path / "chat.jsonl", messages_column="conversations", reward=exact)
    assert env.reset(0)[1].messages == [
        {"role": "user", "content": [{"type": "text", "text": "\nWhat colour?"}]}
    ]
    for idx in (1, 2):
        with pytest.raises(SkipTask) as info:
            env.reset(idx)
        assert info.value.reason == "bad_messages"
    assert env.skipped() == {"bad_messages": 2}


def test_unreadable_images_are_counted_skips(tmp_path):
    (tmp_path / "ok.png").write_bytes(png((1, 2, 3)))
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    (tmp_path / "rows.csv").write_text(
        "image,problem,answer\nok.png,a,1\nbad.png,b,2\ngone.png,c,3\n/dev/zero,d,4\n"
        "ok.png,e\nhttp://example.com/x.png,f,6\n"
    )
    env = DatasetEnv(tmp_path / "rows.csv", image_column="image", prompt="{problem}", reward=exact)
    assert len(env) == 5 and env.skipped() == {"malformed_row": 1}
    assert colors(env.reset(0)[1]) == [(1, 2, 3)]
    reasons = []
    for idx in (1, 2, 3, 4):
        with pytest.raises(SkipTask) as info:
            env.reset(idx)
        reasons.append(info.value.reason)
        assert f"row {idx} column 'image'" in str(info.value)
    assert reasons == ["corrupt_image", "missing_image", "missing_image", "missing_image"]
    assert env.skipped() == {"malformed_row": 1, "corrupt_image": 1, "missing_image": 3}
    assert env.step(env.reset(0)[0], "1").reward == 1.0  # the env goes on


# Rewards -----------------------------------------------------------------------------------


class Recorder:
    """A reward that records its calls and scores 1 for the gold answer."""

    def __init__(self, name="recorder"):
        self.__name__ = name
        self.calls = []

    def __call__(self, completions, **columns):
        self.calls.append((list(completions), columns))
        return [float(c == a) for c, a in zip(completions, columns["answer"], strict=True)]


@pytest.fixture
def parquet_env(sources):
    def make(**kwargs):
        path, split = sources["parquet_folder"]
        kwargs.setdefault("prompt", PROMPT)
        return DatasetEnv(path, split, image_column="image", **kwargs)

    return make


def test_step_and_step_many_call_the_reward_trl_style(parquet_env):
    reward = Recorder()
    env = parquet_env(reward=reward)
    state, _ = env.reset(2)
    result = env.step(state, "circle")
    assert result.reward == 1.0 and result.done and result.info["correct"]
    assert reward.calls == [(["circle"], {"problem": ["Name the shape."], "answer": ["circle"]})]
    states = [env.reset(i)[0] for i in (0, 1, 2, 0)]
    results = env.step_many(states, ["2", "no", "circle", "3"])
    assert len(reward.calls) == 2  # one call for the whole batch
    texts, columns = reward.calls[1]
    assert texts == ["2", "no", "circle", "3"]
    assert columns["answer"] == ["2", "\\frac{3}{4}", "circle", "2"]
    assert [r.reward for r in results] == [1.0, 0.0, 1.0, 0.0]
    assert [r.info["answer"] for r in results] == ["2", "\\frac{3}{4}", "circle", "2"]
    assert env.step_many([], []) == []

    def needs_answer(completions, answer):  # no **kwargs: gets only the columns it names
        return [len(answer)] * len(completions)

    assert parquet_env(reward=needs_answer).step(state, "x").reward == 1.0
    with pytest.raises(DataError, match=r"reward gold_only needs column\(s\) \['gold'\]"):

        def gold_only(completions, gold):
            return [0.0] * len(completions)

        parquet_env(reward=gold_only)


def test_combined_rewards_report_their_parts(parquet_env):
    accuracy = Recorder("accuracy")
    env = parquet_env(reward={accuracy: 1.0, _named("format", lambda c, **_: [0.5] * len(c)): 0.2})
    state, _ = env.reset(2)
    result = env.step(state, "circle")
    assert result.reward == pytest.approx(1.1)
    assert result.info["reward_parts"] == {"accuracy": 1.0, "format": 0.5}
    assert result.info["correct"]  # from the accuracy part, not the total
    env = parquet_env(reward=[_named("format", lambda c, **_: [1.0] * len(c)), accuracy])
    wrong = env.step(state, "square")
    assert wrong.reward == 1.0 and not wrong.info["correct"]  # format alone is not correct
    records = [{"info": env.step(state, t).info, "reward": 0.0} for t in ("circle", "square")]
    assert env.metrics(records) == {"accuracy": 0.5, "format_rate": 1.0,
                                    "reward_parts/format": 1.0, "reward_parts/accuracy": 0.5,
                                    "reward_errors": 0.0}  # fmt: skip


def _named(name, fn):
    fn.__name__ = name
    return fn


def test_a_failing_reward_scores_zero_and_never_raises(parquet_env):
    def picky(completions, answer, **_):
        if any("boom" in c for c in completions):
            raise RuntimeError("cannot parse\nthis text")
        return [float(c == a) for c, a in zip(completions, answer, strict=True)]

    env = parquet_env(reward=picky)
    states = [env.reset(i)[0] for i in (0, 1, 2)]
    results = env.step_many(states, ["2", "boom", "circle"])
    assert [r.reward for r in results] == [1.0, 0.0, 1.0]  # retried one at a time
    assert results[1].info["reward_error"] == "picky: RuntimeError: cannot parse this text"
    assert "reward_error" not in results[0].info and env.reward_errors == 1
    assert env.step_metrics([r.info for r in results]) == {
        "reward_error_rate": pytest.approx(1 / 3)
    }
    for bad in ([1.0, 2.0], [float("nan")], ["yes"], "1", None):
        env = parquet_env(reward=lambda c, bad=bad, **_: bad)
        result = env.step(states[0], "2")
        assert result.reward == 0.0 and "reward_error" in result.info
    env = parquet_env(reward=lambda c, **_: [None] * len(c))
    assert env.step(states[0], "2").reward == 0.0
    for text in ["", "x" * 20000, "\x00\u202e<|im_end|>", None, b"\xff"]:
        assert parquet_env(reward=picky).step(states[0], text).done


_STEP_ENV: dict = {}


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=400))
def test_step_never_raises_on_model_text(tmp_path_factory, text):
    if "env" not in _STEP_ENV:
        root = tmp_path_factory.mktemp("step")
        pq.write_table(toy_table(), root / "train.parquet")
        _STEP_ENV["env"] = DatasetEnv(
            root, prompt=PROMPT, reward=[exact, lambda c, **_: [1] * len(c)]
        )
    env = _STEP_ENV["env"]
    result = env.step(env.reset(0)[0], text)
    assert result.reward in (1.0, 2.0) and result.info["correct"] == (text.strip() == "2")


def test_reward_is_required(parquet_env):
    for missing in (None, [], {}):
        with pytest.raises(ValueError, match="reward= is required"):
            parquet_env(reward=missing)
    with pytest.raises(ValueError, match="finite"):
        parquet_env(reward={exact: float("inf")})
    with pytest.raises(ValueError, match="exactly one of prompt"):
        parquet_env(reward=exact, prompt=None)


def test_answer_column_is_the_gold_for_rewards(parquet_env, tmp_path):
    reward = Recorder()
    env = parquet_env(reward=reward, answer_column="problem")
    state, _ = env.reset(2)
    assert env.step(state, "Name the shape.").info == {
        "correct": True,
        "answer": "Name the shape.",
        "format_ok": False,
    }
    assert reward.calls[0][1]["answer"] == ["Name the shape."]
    pytest.importorskip("vlmgym_envs.rewards")
    no_gold = write_cells(tmp_path)
    with pytest.raises(DataError, match="reward numeric compares with the gold answer") as info:
        DatasetEnv(no_gold, prompt="Look.", reward={"numeric": 1.0, "format": 0.1})
    assert "answer_column=" in str(info.value)
    assert len(DatasetEnv(no_gold, prompt="Look.", reward="format")) == 1


def test_derived_columns_keep_and_max_rows(parquet_env):
    def length(row):
        if row["answer"] == "circle":
            raise SkipTask("too_round", "circles are skipped")
        return str(len(row["answer"]))

    env = parquet_env(reward=exact, derived={"length": length}, info_columns=["length"])
    assert len(env) == 2 and env.skipped() == {"too_round": 1}
    assert env.step(env.reset(1)[0], "x").info["length"] == "11"
    env = parquet_env(reward=exact, keep=lambda row: row["answer"] != "2", max_rows=1)
    assert len(env) == 1 and env.reset(0)[0].row == 1


def test_registered_as_dataset(sources):
    names = vlmgym_envs.available()
    assert {"dataset", "geometry3k", "clevr_count", "mathvista"} <= set(names)
    path, split = sources["parquet_folder"]
    env = vlmgym_envs.make("dataset", path=str(path), split=split, image_column="image",
                           prompt=PROMPT, system_prompt="Be brief.", reward=exact)  # fmt: skip
    assert isinstance(env, DatasetEnv) and len(env) == 3
    state, obs = env.reset(0)
    assert obs.messages[0]["role"] == "system" and env.step(state, "2").reward == 1.0
