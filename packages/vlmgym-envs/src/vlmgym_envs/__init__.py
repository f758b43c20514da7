"""Environments and rewards for RL on vision-language models (pure Python, no JAX).

    import vlmgym_envs
    env = vlmgym_envs.make("shapes")  # also osv5m (geoguessr), geospot, nlvr2, caption
    # tools: shapes_zoom, geoguessr_zoom; several guesses: geoguessr_feedback
    state, obs = env.reset(0)  # obs.messages: HF chat messages with PIL images
    result = env.step(state, "red")  # StepResult(reward, done, info, observation, state)

    # any table of rows and a reward; standard tasks: geometry3k, clevr_count, mathvista
    env = vlmgym_envs.DatasetEnv("hiyouga/geometry3k", "train", image_column="images",
                                 prompt="{problem}", reward="math")

Importing this package loads no dataset, table or heavy dependency; each environment module
but the light `dataset_env` is imported by `make` on first use.

Layout: `core` (the `Env` API), `registry` (`make`), `answers` (answer parsers the tasks
share), one module or folder per task (`shapes`, `wordcount`, `nlvr2`, `geoguessr/`: env,
answer, reward, reward_v1, geospot, gazetteer, geography, metrics, zoom, feedback;
`caption/`: env, cider; `shapes_zoom`), `tools` (declaring tools, parsing Qwen's
`<tool_call>`s, their prompt and result messages), `tool_env` (`ToolEnv`: tools around any
env), `zoom` (the zoom tool), `dataset_env` (`DatasetEnv`; `dataset_table` reads its table,
`dataset_prompt` builds its messages, `dataset_reward` calls its reward) and `tasks`
(standard tasks on it), and `data/` (errors and skip counts, bounded image decoding,
archives, tables, the Hugging Face hub cache). A task owns its evaluation metrics and
plots (`Env.metrics`, `Env.plots`) and its training-step metrics (`Env.step_metrics`).
`Env.reset` raises `SkipTask` for a task it cannot show (a corrupt or oversized image...);
`Env.skipped()` counts what was left out.
"""

from vlmgym_envs.core import (
    Env,
    Message,
    Observation,
    StepResult,
    as_text,
    system_message,
    user_message,
)
from vlmgym_envs.data.archives import extract_zip
from vlmgym_envs.data.errors import DataError, SkipCounts, SkipTask, UnsafeArchiveError
from vlmgym_envs.data.images import ImageLimits, decode_image
from vlmgym_envs.dataset_env import DatasetEnv, DatasetState
from vlmgym_envs.registry import available, make, register, resolve, unregister
from vlmgym_envs.tool_env import ToolEnv, ToolState, tool_metrics
from vlmgym_envs.tools import (
    CallError,
    ParsedCalls,
    Tool,
    ToolArgumentError,
    ToolCall,
    ToolContext,
    check_arguments,
    format_tool_call,
    parse_tool_calls,
    tool,
    tool_response_message,
    tools_prompt,
)
from vlmgym_envs.zoom import crop_region, zoom_tool

__all__ = [
    "CallError",
    "DataError",
    "DatasetEnv",
    "DatasetState",
    "Env",
    "ImageLimits",
    "Message",
    "Observation",
    "ParsedCalls",
    "SkipCounts",
    "SkipTask",
    "StepResult",
    "Tool",
    "ToolArgumentError",
    "ToolCall",
    "ToolContext",
    "ToolEnv",
    "ToolState",
    "UnsafeArchiveError",
    "as_text",
    "available",
    "check_arguments",
    "crop_region",
    "decode_image",
    "extract_zip",
    "format_tool_call",
    "make",
    "parse_tool_calls",
    "register",
    "resolve",
    "system_message",
    "tool",
    "tool_metrics",
    "tool_response_message",
    "tools_prompt",
    "unregister",
    "user_message",
    "zoom_tool",
]
