"""Environments and rewards for RL on vision-language models (pure Python, no JAX).

    import vlmgym_envs
    env = vlmgym_envs.make("shapes")  # also osv5m (geoguessr), geospot, nlvr2, caption
    state, obs = env.reset(0)  # obs.messages: HF chat messages with PIL images
    result = env.step(state, "red")  # StepResult(reward, done, info, observation, state)

Importing this package loads no dataset, table or heavy dependency; each environment module
is imported by `make` on first use.

Layout: `core` (the `Env` API), `registry` (`make`), `answers` (answer parsers the tasks
share), one module or folder per task (`shapes`, `wordcount`, `nlvr2`, `geoguessr/`: env,
answer, reward, reward_v1, geospot, gazetteer, geography, metrics; `caption/`: env, cider),
and `data/` (errors and skip counts, bounded image decoding, archives, tables, the Hugging
Face hub cache). A task owns its evaluation metrics and plots (`Env.metrics`, `Env.plots`)
and its training-step metrics (`Env.step_metrics`). `Env.reset` raises `SkipTask` for a
task it cannot show (a corrupt or oversized image...); `Env.skipped()` counts what was left
out.
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
from vlmgym_envs.registry import available, make, register, resolve, unregister

__all__ = [
    "DataError",
    "Env",
    "ImageLimits",
    "Message",
    "Observation",
    "SkipCounts",
    "SkipTask",
    "StepResult",
    "UnsafeArchiveError",
    "as_text",
    "available",
    "decode_image",
    "extract_zip",
    "make",
    "register",
    "resolve",
    "system_message",
    "unregister",
    "user_message",
]
