"""Built-in model presets: a tiny randomly initialised Qwen-VL (Qwen3-VL by default,
Qwen2.5-VL or Qwen2-VL with `--preset_family`) with an offline tokenizer.

`vlmgym-train` with no `--model_dir` trains this preset on the `shapes` environment. Its
word-level tokenizer is built from the environment's own prompts, so every answer word is
a single token and a random policy says the right word often enough for RL to start.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from vlmgym_envs import Env, SkipTask

TINY_PRESET: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vision_depth=2,
    vision_hidden_size=32,
    vision_heads=2,
    fullatt_block_indexes=(1,),
)


def environment_texts(env: Env, max_tasks: int = 400) -> list[str]:
    """Every text the tiny tokenizer must cover: prompts of the env's first tasks, its
    answer vocabulary when it declares one, and, for an env with tool phrases, what the env
    replies to each phrase (tool results) on its first tasks."""
    texts: list[str] = []
    for idx in range(min(len(env), max_tasks)):
        try:
            _, obs = env.reset(idx)
        except SkipTask:  # an unreadable task: counted by the env, its text not needed
            continue
        texts.extend(_message_texts(obs.messages))
    # An env (or its module) may declare its answer words: `answer_vocabulary() -> words`.
    vocabulary = getattr(env, "answer_vocabulary", None) or getattr(
        sys.modules.get(type(env).__module__), "answer_vocabulary", None
    )
    if callable(vocabulary):
        texts.append(" ".join(vocabulary()))
    texts.extend(_reply_texts(env, environment_phrases(env)))
    return texts


def environment_phrases(env: Env) -> list[str]:
    """Strings the tiny tokenizer gives one token each: the env's `tool_phrases()` (whole
    tool calls, e.g. `vlmgym_envs.ToolEnv`), so a random policy says a valid call as often
    as it says any answer word. Empty for envs without tools."""
    phrases = getattr(env, "tool_phrases", None)
    return [str(p) for p in phrases()] if callable(phrases) else []


def _message_texts(messages: list[dict[str, Any]]) -> list[str]:
    texts: list[str] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        for part in content or []:
            if part.get("type") == "text":
                texts.append(str(part.get("text", "")))
    return texts


def _reply_texts(env: Env, phrases: list[str], max_tasks: int = 8) -> list[str]:
    """The texts of the env's replies to each phrase on its first tasks."""
    texts: list[str] = []
    for idx in range(min(len(env), max_tasks) if phrases else 0):
        try:
            state, _ = env.reset(idx)
        except SkipTask:
            continue
        for phrase in phrases:
            result = env.step(state, phrase)
            if result.observation is not None:
                texts.extend(_message_texts(result.observation.messages))
    return texts


# The vision tower starts at a larger scale than the text weights (0.02), so image features
# stand out against token embeddings: on `shapes`, colour conditioning then wins the race
# against collapsing onto one colour word (seeds 0-2 all learn; at 0.02 some collapse).
TINY_VISION_INIT_SCALE = 0.1


def write_tiny_preset(
    directory: str | Path,
    env: Env,
    *,
    seed: int = 0,
    vision_init_scale: float = TINY_VISION_INIT_SCALE,
    family: str = "qwen3_vl",
) -> Path:
    """Write the tiny preset's model directory for `env` (tokenizer, config, random params)
    in the model family `family`."""
    from vlmgym_model import write_tiny_model

    return write_tiny_model(
        directory,
        environment_texts(env),
        seed=seed,
        vision_init_scale=vision_init_scale,
        family=family,
        phrases=environment_phrases(env),
        **TINY_PRESET,
    )
