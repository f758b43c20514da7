"""`ToolEnv`'s messages, rendered by Qwen2.5-VL's chat template (no tool support), equal
what the tool-aware Qwen2.5 template renders for the conventional form of the same
conversation: `tools=` plus assistant `tool_calls` and `role: tool` messages.

The reference template is the real checkpoint's own (`tokenizer_config.json` of the
real-weights fixture: Qwen2.5's template with tools), rendered by transformers and by
vlm-gym's renderer; ours goes through the vlm-gym Processor of the same checkpoint, whose
`chat_template.json` is Qwen2.5-VL's.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from vlmgym_envs import (
    Env,
    Observation,
    StepResult,
    ToolEnv,
    format_tool_call,
    parse_tool_calls,
    system_message,
    tool,
    user_message,
)
from vlmgym_model.chat_template import compile_chat_template, template_messages
from vlmgym_model.tiny import QWEN2_5_VL_CHAT_TEMPLATE


class SumEnv(Env[int]):
    """Text only: "What is 17 + 25?"; reward 1 for "42"."""

    def __init__(self, system: str | None) -> None:
        self.system = system

    def __len__(self) -> int:
        return 1

    def reset(self, idx: int) -> tuple[int, Observation]:
        messages = [user_message("What is 17 + 25? Use the tools.")]
        if self.system is not None:
            messages.insert(0, system_message(self.system))
        return idx, Observation(messages)

    def step(self, state: int, text: str) -> StepResult[int]:
        return StepResult(float(text.strip() == "42"), True, {})


@tool
def add(a: int, b: int) -> str:
    """Add two integers.

    Args:
      a: the first.
      b: the second, "quoted" and non-ASCII: é.
    """
    return str(a + b)


@tool
def echo(text: str) -> str:
    """Repeat a text."""
    return text


# Each turn: (text before the calls, [(name, arguments)]); the last turn answers.
CONVERSATIONS = {
    "one_call": [("", [("add", {"a": 17, "b": 25})]), ("42", [])],
    "two_calls_then_errors": [
        ("Let me compute.", [("add", {"a": 17, "b": 25}), ("echo", {"text": "a\nb é"})]),
        ("", [("mul", {"a": 1}), ("add", {"a": "x", "b": 1})]),
        ("42", []),
    ],
}


def reply_text(prefix: str, calls: list[tuple[str, dict[str, Any]]]) -> str:
    """The reply as the model writes it: the text, then each call on its own lines."""
    pieces = [prefix] if prefix else []
    return "\n".join([*pieces, *(format_tool_call(n, a) for n, a in calls)])


def run_episode(env: ToolEnv, turns: list[Any]) -> list[tuple[list[dict], list[dict]]]:
    """The episode as chunks (messages the rollout appends from ToolEnv, the same in the
    conventional form): the first observation, then each reply and each tool response."""
    state, obs = env.reset(0)
    first: list[dict[str, Any]] = []
    if env.env.system is not None:
        first.append({"role": "system", "content": env.env.system})
    first.append({"role": "user", "content": obs.messages[1]["content"][0]["text"]})
    chunks = [(list(obs.messages), first)]
    for prefix, calls in turns:
        text = reply_text(prefix, calls)
        assert [(c.name, c.arguments) for c in parse_tool_calls(text).calls] == calls
        message: dict[str, Any] = {"role": "assistant", "content": prefix}
        if calls:
            message["tool_calls"] = [
                {"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls
            ]
        chunks.append(([{"role": "assistant", "content": [{"type": "text", "text": text}]}],
                       [message]))  # fmt: skip
        result = env.step(state, text)
        if result.done:
            break
        response = result.observation.messages[0]["content"][0]["text"]
        tool_messages = [
            {"role": "tool", "content": chunk.removeprefix("<tool_response>\n")}
            for chunk in response.removesuffix("\n</tool_response>").split("\n</tool_response>\n")
        ]
        assert len(tool_messages) == len(calls)
        chunks.append((list(result.observation.messages), tool_messages))
        state = result.state
    return chunks


@pytest.fixture(scope="module")
def tool_template(real_dirs) -> str:
    config = json.loads((real_dirs.hf_dir / "tokenizer_config.json").read_text("utf-8"))
    template = config["chat_template"]
    assert "<tool_call>" in template and "tools" in template  # a tool-aware template
    return template


@pytest.mark.parametrize("system", [None, "You answer arithmetic questions."])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_tool_env_renders_like_the_tool_aware_template(real_dirs, tool_template, name, system):
    from transformers import AutoTokenizer
    from vlmgym_model import Processor

    # Qwen2.5's default system text when there is none; ToolEnv takes it as system_prompt.
    default = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    env = ToolEnv(SumEnv(system), [add, echo], system_prompt=default)
    chunks = run_episode(env, CONVERSATIONS[name])
    tools = [add.schema(), echo.schema()]
    processor = Processor.from_model_dir(real_dirs.model_dir)
    hf_tokenizer = AutoTokenizer.from_pretrained(real_dirs.hf_dir)
    for k in range(1, len(chunks) + 1):  # every turn boundary of the conversation
        prefix = [m for ours, _ in chunks[:k] for m in ours]
        conv = [m for _, theirs in chunks[:k] for m in theirs]
        generation = prefix[-1]["role"] != "assistant"
        rendered = processor.apply_chat_template(prefix, add_generation_prompt=generation)
        direct = compile_chat_template(QWEN2_5_VL_CHAT_TEMPLATE).render(
            messages=template_messages(prefix), add_generation_prompt=generation
        )
        reference = hf_tokenizer.apply_chat_template(
            conv,
            tools=tools,
            chat_template=tool_template,
            tokenize=False,
            add_generation_prompt=generation,
        )
        ours_reference = compile_chat_template(tool_template).render(
            messages=conv, tools=tools, add_generation_prompt=generation
        )
        assert rendered == direct == reference == ours_reference, k
    assert "<tool_response>\n42\n</tool_response>" in reference
