"""Tools: parsing Qwen's calls, argument checks, declaring tools, and `ToolEnv` episodes."""

from __future__ import annotations

import json
import math
import time
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from vlmgym_envs import (
    Env,
    Observation,
    StepResult,
    Tool,
    ToolArgumentError,
    ToolCall,
    ToolContext,
    ToolEnv,
    check_arguments,
    format_tool_call,
    parse_tool_calls,
    system_message,
    tool,
    tool_metrics,
    tool_response_message,
    tools_prompt,
    user_message,
)
from vlmgym_envs.tools import ERROR_KINDS, CallError

# Parsing ------------------------------------------------------------------------------


def test_parse_one_call_in_qwen_format():
    text = format_tool_call("zoom", {"x0": 0, "y0": 0.5, "x1": 1, "y1": 1})
    assert text == (
        '<tool_call>\n{"name": "zoom", "arguments": {"x0": 0, "y0": 0.5, "x1": 1, "y1": 1}}'
        "\n</tool_call>"
    )
    parsed = parse_tool_calls(text)
    assert parsed.calls == [ToolCall("zoom", {"x0": 0, "y0": 0.5, "x1": 1, "y1": 1})]
    assert parsed.errors == []


def test_parse_several_calls_whitespace_and_surrounding_text():
    text = (
        'Let me look.<tool_call>{"name":"a","arguments":{"k":1}}</tool_call> then\n'
        '<tool_call>\n\n  {"name": "b", "arguments": {}}  \t\n</tool_call> done'
    )
    parsed = parse_tool_calls(text)
    assert parsed.calls == [ToolCall("a", {"k": 1}), ToolCall("b", {})]


def test_parse_missing_closing_tag_only_at_the_end_and_only_when_complete():
    ok = parse_tool_calls('<tool_call>\n{"name": "a", "arguments": {"k": 1}}\n')
    assert ok.calls == [ToolCall("a", {"k": 1})]
    cut = parse_tool_calls('<tool_call>\n{"name": "a", "argum')
    assert [e.kind for e in cut.errors] == ["unclosed"] and not cut.calls
    # an opening tag followed by another opening tag: unclosed, the second still parsed
    two = parse_tool_calls('<tool_call>{"name": "a"} <tool_call>{"name": "b"}</tool_call>')
    assert [type(i).__name__ for i in two.items] == ["CallError", "ToolCall"]
    assert two.items[0].kind == "unclosed" and two.calls == [ToolCall("b", {})]


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ("{name: zoom}", "invalid_json"),
        ("", "invalid_json"),
        ('["zoom"]', "not_object"),
        ('{"arguments": {}}', "missing_name"),
        ('{"name": 3}', "missing_name"),
        ('{"name": "zoom", "arguments": [1]}', "bad_arguments"),
        ('{"name": "zoom", "arguments": "not json"}', "bad_arguments"),
        ("[" * 50_000, "invalid_json"),  # deep nesting: RecursionError inside json
    ],
)
def test_parse_malformed_calls_become_errors(body, kind):
    parsed = parse_tool_calls(f"<tool_call>{body}</tool_call>")
    assert [e.kind for e in parsed.errors] == [kind] and not parsed.calls


def test_parse_arguments_as_json_string_and_no_tags():
    parsed = parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"a\\": 2}"}</tool_call>')
    assert parsed.calls == [ToolCall("f", {"a": 2})]
    assert not parse_tool_calls("red") and not parse_tool_calls("</tool_call> {}")
    assert not parse_tool_calls(None) and not parse_tool_calls(b"\xff\xfe")


_FRAGMENTS = st.sampled_from(
    ["<tool_call>", "</tool_call>", "{", "}", '"name"', '"arguments"', ":", ",", '"zoom"',
     "[", "]", "1e999", "NaN", "\n", " ", '"', "\\", "\x00", "é", "null", "0.5"]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.lists(_FRAGMENTS | st.text(max_size=5)).map("".join)))
def test_parse_never_raises_on_any_text(text):
    parsed = parse_tool_calls(text)
    for item in parsed.items:
        assert isinstance(item, ToolCall | CallError)
        if isinstance(item, CallError):
            assert item.kind in ERROR_KINDS
        else:
            assert isinstance(item.arguments, dict) and isinstance(item.name, str)
    assert len(parsed.items) <= text.count("<tool_call>")


# Arguments ----------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "n": {"type": "integer", "minimum": 1, "maximum": 3},
        "x": {"type": "number"},
        "mode": {"type": "string", "enum": ["a", "b"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "flag": {"type": ["boolean", "null"]},
    },
    "required": ["n"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    ("arguments", "ok"),
    [
        ({"n": 2}, True),
        ({"n": 2.0, "x": 1, "mode": "b", "tags": ["t"], "flag": None}, True),
        ({"n": 2, "flag": False}, True),
        ({}, False),  # required
        ({"n": True}, False),  # a bool is no integer
        ({"n": 2.5}, False),
        ({"n": 0}, False),  # minimum
        ({"n": 4}, False),  # maximum
        ({"n": 1, "x": math.nan}, False),
        ({"n": 1, "x": math.inf}, False),
        ({"n": 1, "x": "1"}, False),
        ({"n": 1, "mode": "c"}, False),  # enum
        ({"n": 1, "tags": ["t", 2]}, False),  # items
        ({"n": 1, "other": 1}, False),  # additionalProperties
        ({"n": 1, "flag": 0}, False),
    ],
)
def test_check_arguments(arguments, ok):
    problems = check_arguments(SCHEMA, arguments)
    assert (problems == []) == ok, problems


def test_tool_from_function_infers_the_schema():
    @tool
    def lookup(city: str, unit: Literal["km", "mi"] = "km", limit: int = 3) -> str:
        """Look a city up.

        Args:
          city: the city's name.
          unit: distance unit.
        """
        return f"{city} {unit} {limit}"

    assert lookup.name == "lookup" and lookup.description == "Look a city up."
    assert lookup.parameters == {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "the city's name."},
            "unit": {"type": "string", "enum": ["km", "mi"], "description": "distance unit."},
            "limit": {"type": "integer"},
        },
        "required": ["city"],
        "additionalProperties": False,
    }
    assert not lookup.takes_context
    assert lookup({"city": "Oslo"}, ToolContext()) == "Oslo km 3"
    assert lookup.schema()["function"]["name"] == "lookup"


# ToolEnv ------------------------------------------------------------------------------


class EchoEnv(Env[int]):
    """Single turn: reward 1 when the reply is exactly "yes"; shows one 8 x 6 image."""

    def __init__(self, system: str | None = None) -> None:
        self.system = system

    def __len__(self) -> int:
        return 3

    def reset(self, idx: int) -> tuple[int, Observation]:
        messages = [user_message(f"Task {idx}?", [Image.new("RGB", (8, 6), (idx, 0, 0))])]
        if self.system:
            messages.insert(0, system_message(self.system))
        return idx, Observation(messages)

    def step(self, state: int, text: str) -> StepResult[int]:
        return StepResult(float(text == "yes"), True, {"answer": text, "task": state})

    def metrics(self, records):
        return {"mean_task": sum(r["state"] for r in records) / len(records)}


def make_tools() -> list[Tool]:
    @tool
    def size(context: ToolContext) -> list:
        """The image's size, and the image."""
        image = context.images[0]
        return [f"{image.width}x{image.height}", image]

    @tool
    def add(a: int, b: int) -> str:
        """Add two integers."""
        if a < 0:
            raise ToolArgumentError("a must be >= 0")
        return str(a + b)

    @tool
    def boom() -> str:
        """Always fails."""
        raise RuntimeError("kaput")

    @tool
    def slow() -> str:
        """Takes a while."""
        time.sleep(0.5)
        return "late"

    @tool
    def odd() -> str:
        """Returns no text."""
        return 42  # type: ignore[return-value]

    return [size, add, boom, slow, odd]


def call(name: str, **arguments) -> str:
    return format_tool_call(name, arguments)


def test_reset_renders_tools_into_the_system_message():
    tools = make_tools()
    env = ToolEnv(EchoEnv(), tools)
    state, obs = env.reset(1)
    system = obs.messages[0]
    assert system["role"] == "system"
    assert system["content"] == [
        {"type": "text", "text": "You are a helpful assistant." + tools_prompt(tools)}
    ]
    lines = tools_prompt(tools).split("\n")
    intro = "You may call one or more functions to assist with the user query."
    assert lines[:6] == ["", "", "# Tools", "", intro, ""]
    assert [json.loads(line)["function"]["name"] for line in lines[8:13]] == [
        "size", "add", "boom", "slow", "odd"
    ]  # fmt: skip
    assert obs.messages[1]["role"] == "user" and obs.images[0].size == (8, 6)
    assert state.inner == 1 and state.images[0].size == (8, 6) and state.calls == 0
    # the wrapped env's own system text is kept, the tools appended to it
    _, obs2 = ToolEnv(EchoEnv(system="Be brief."), tools).reset(0)
    assert obs2.text.startswith("Be brief.\n\n# Tools\n") and len(obs2.messages) == 2


def test_first_view_is_downscaled_and_tools_read_full_resolution():
    env = ToolEnv(EchoEnv(), make_tools(), first_view_side=4)
    state, obs = env.reset(2)
    assert obs.images[0].size == (4, 3) and state.images[0].size == (8, 6)
    result = env.step(state, call("size"))
    content = result.observation.messages[0]["content"]
    assert [p["type"] for p in content] == ["text", "image", "text"]
    assert (
        content[0]["text"] == "<tool_response>\n8x6" and content[2]["text"] == "\n</tool_response>"
    )
    assert content[1]["image"].size == (8, 6)


def test_tool_turn_then_final_answer_with_call_cost():
    env = ToolEnv(EchoEnv(), make_tools(), call_cost=0.1)
    state, _ = env.reset(0)
    r1 = env.step(state, "Adding. " + call("add", a=2, b=3) + call("add", a=1, b=1))
    assert (r1.reward, r1.done) == (0.0, False)
    assert r1.observation.messages == [
        tool_response_message([[{"type": "text", "text": "5"}], [{"type": "text", "text": "2"}]])
    ]
    assert r1.observation.messages[0]["content"] == [
        {"type": "text", "text": "<tool_response>\n5\n</tool_response>\n<tool_response>\n2\n"
         "</tool_response>"}
    ]  # fmt: skip
    assert r1.info["tool_calls"] == 2 and r1.info["turns"] == 1
    assert r1.state.calls == 2 and state.calls == 0  # states are values
    r2 = env.step(r1.state, "yes")
    assert r2.done and r2.reward == pytest.approx(1.0 - 0.2)
    assert r2.info == {"answer": "yes", "task": 0, "tool_calls": 2, "tool_errors": {}, "turns": 2}
    # stepping the same state again gives the same, independent result
    assert env.step(r1.state, "yes").reward == r2.reward
    assert env.step(state, "no").reward == 0.0


def test_a_call_bonus_counts_only_calls_that_ran():
    bonus = ToolEnv(EchoEnv(), make_tools(), call_cost=-0.1, max_calls=4)
    cost = ToolEnv(EchoEnv(), make_tools(), call_cost=0.1, max_calls=4)
    for env, expected in ((bonus, 1.0 + 0.1), (cost, 1.0 - 0.2)):
        state, _ = env.reset(0)
        made = env.step(state, call("add", a=2, b=3) + "<tool_call>\n{oops\n</tool_call>")
        assert made.state.calls == 2 and made.state.ran == 1
        assert env.step(made.state, "yes").reward == pytest.approx(expected)


def test_errors_become_text_results_and_counts():
    env = ToolEnv(EchoEnv(), make_tools(), max_calls=10, timeout_s=0.05)
    state, _ = env.reset(0)
    text = "".join(
        [
            call("nope"),
            call("add", a=1),
            call("add", a=-1, b=2),
            call("boom"),
            call("slow"),
            call("odd"),
            "<tool_call>{bad json}</tool_call>",
        ]
    )
    t0 = time.monotonic()
    result = env.step(state, text)
    assert time.monotonic() - t0 < 0.4  # the slow tool was not waited for
    assert not result.done and result.reward == 0.0
    kinds = ["unknown_tool", "bad_arguments", "bad_arguments", "exception", "timeout",
             "bad_output", "invalid_json"]  # fmt: skip
    assert [r["error"] for r in result.info["tool_results"]] == kinds
    assert result.info["tool_errors"] == {
        "bad_arguments": 2, "bad_output": 1, "exception": 1, "invalid_json": 1, "timeout": 1,
        "unknown_tool": 1,
    }  # fmt: skip
    response = result.observation.text
    assert response.count("<tool_response>\nError (") == 7
    assert "no tool named 'nope'" in response and "missing 'b'" in response
    assert "a must be >= 0" in response and "RuntimeError: kaput" in response
    assert result.state.calls == 7


def test_budget_is_per_episode_and_ends_the_episode_after_the_notice():
    env = ToolEnv(EchoEnv(), make_tools(), max_calls=2)
    state, _ = env.reset(0)
    r1 = env.step(state, call("add", a=1, b=1) + call("add", a=2, b=2) + call("add", a=3, b=3))
    assert [r["error"] for r in r1.info["tool_results"]] == [None, None, "budget"]
    assert "budget of 2 calls is used up" in r1.observation.text
    assert r1.state.exhausted and r1.state.calls == 2
    r2 = env.step(r1.state, call("add", a=1, b=1))  # calls again after the notice: final
    assert r2.done and r2.reward == 0.0 and r2.info["answer"].startswith("<tool_call>")
    # budget zero: every call is refused, the next reply is scored
    env0 = ToolEnv(EchoEnv(), make_tools(), max_calls=0)
    s0, _ = env0.reset(0)
    r = env0.step(s0, call("add", a=1, b=1))
    assert r.info["tool_errors"] == {"budget": 1} and r.info["tool_calls"] == 0
    assert env0.step(r.state, "yes").reward == 1.0


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=300) | st.lists(_FRAGMENTS).map("".join))
def test_tool_env_never_raises_on_model_output(text):
    env = ToolEnv(EchoEnv(), make_tools(), max_calls=3)
    state, _ = env.reset(0)
    result = env.step(state, text)
    assert math.isfinite(result.reward)
    assert result.done == ("<tool_call>" not in text)


def test_tool_metrics_and_env_metrics_unwrap_the_state():
    infos = [
        {"tool_calls": 2, "tool_errors": {"timeout": 1}, "turns": 3},
        {"tool_calls": 0, "tool_errors": {}, "turns": 1},
        {"weird": "info", "tool_calls": "x"},
    ]
    assert tool_metrics(infos) == {
        "tool/call_rate": pytest.approx(1 / 3),
        "tool/calls_per_episode": pytest.approx(2 / 3),
        "tool/turns_per_episode": pytest.approx(4 / 3),
        "tool/error_rate": pytest.approx(0.5),
    }
    assert tool_metrics([]) == {}
    env = ToolEnv(EchoEnv(), make_tools())
    records = [{"state": {"inner": 2, "calls": 1}, "info": infos[0]}, {"state": 0, "info": {}}]
    metrics = env.metrics(records)
    assert metrics["mean_task"] == 1.0 and metrics["tool/call_rate"] == 0.5
    assert env.step_metrics(infos)["tool/turns_per_episode"] == pytest.approx(4 / 3)


def test_tool_metrics_split_the_env_info_by_whether_a_tool_was_called():
    infos = [
        {"tool_calls": 1, "turns": 2, "correct": True, "distance_km": 10.0},
        {"tool_calls": 2, "turns": 3, "correct": False, "distance_km": float("nan")},
        {"tool_calls": 0, "turns": 1, "correct": False, "kind": "color"},
    ]
    metrics = tool_metrics(infos)
    assert metrics["tool/called/correct"] == 0.5 and metrics["tool/direct/correct"] == 0.0
    assert metrics["tool/called/distance_km"] == 10.0  # non-finite values are left out
    assert not any(k.endswith(("/kind", "/turns", "/tool_calls")) for k in metrics)
    assert "tool/direct/correct" not in tool_metrics(infos[:2])


def test_tool_env_rejects_bad_configuration():
    with pytest.raises(ValueError, match="distinct"):
        ToolEnv(EchoEnv(), make_tools()[:1] * 2)
    with pytest.raises(ValueError):
        ToolEnv(EchoEnv(), make_tools(), timeout_s=0)
