"""Evaluation of multi-turn environments (tool calls, feedback): whole episodes per task,
recorded turn by turn.

Each task's episodes run through `rollout.run_groups`, the training rollout (token-exact
turns, `max_turns`), with task `tasks[p]` drawing from `fold_in(key, p)`: a task's
samples do not depend on how tasks are batched, so a resumed evaluation reproduces an
uninterrupted one. A record is one episode: the final turn's completion and info, the
summed reward, and `turns`: per turn its text, the tool calls it made, the reward it got
and the sizes of the images the env returned after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from vlmgym_envs import Env, parse_tool_calls
from vlmgym_model import Sampler, SamplingParams

from vlmgym_train.jsonable import jsonable
from vlmgym_train.rollout import Trajectory, run_groups


def _turn_records(traj: Trajectory) -> list[dict[str, Any]]:
    turns = []
    for k, text in enumerate(traj.texts):
        calls = parse_tool_calls(text)
        turns.append(
            {
                "text": text,
                "tool_calls": [{"name": c.name, "arguments": c.arguments} for c in calls.calls],
                "tool_call_errors": len(calls.errors),
                "reward": traj.rewards[k] if k < len(traj.rewards) else None,
                "returned_images": traj.returned_images[k] if k < len(traj.returned_images) else [],
            }
        )
    return turns


def episode_records(
    env: Env,
    sampler: Sampler,
    params: Any,
    tasks: Sequence[int],
    positions: Sequence[int],
    sampling: SamplingParams,
    key: jax.Array,
    *,
    max_turns: int,
    prompt_text: Any,
    image_reference: Any,
) -> list[dict[str, Any]]:
    """One record per (task, sample) episode of `tasks` (readable ones), `positions[i]`
    being task i's index in the evaluation's task list (its sampling key)."""
    records = []
    runs: list[list[int]] = []  # tasks at consecutive positions: one rollout call each
    for i, position in enumerate(positions):
        if runs and positions[runs[-1][-1]] + 1 == position:
            runs[-1].append(i)
        else:
            runs.append([i])
    for run in runs:
        trajs, _, _ = run_groups(
            env, sampler, params, [tasks[i] for i in run], sampling, key,
            max_turns=max_turns, group_offset=int(positions[run[0]]),
        )  # fmt: skip
        for k, traj in enumerate(trajs):
            j = k % sampling.num_samples
            info = jsonable(traj.info)
            records.append(
                {
                    "task": int(traj.task),
                    "sample": j,
                    "prompt": prompt_text(traj.messages[:1] if traj.messages else []),
                    "image": image_reference(traj.state, int(traj.task)),
                    "completion": traj.texts[-1] if traj.texts else "",
                    "parsed": info.get("parsed", info.get("answer")),
                    "reward": float(traj.reward),
                    "finish_reason": info.get("finish_reason"),
                    "info": info,
                    "num_turns": traj.turns,
                    "turns": _turn_records(traj),
                }
            )
    return records


def turn_metrics(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Tool-call rate, turns per episode and mean reward per turn over episode records
    (records without `turns`, single-turn ones, give nothing)."""
    episodes = [r for r in records if "turns" in r]
    if not episodes:
        return {}
    turns = [t for r in episodes for t in r["turns"]]
    out = {
        "turns/mean": float(np.mean([r["num_turns"] for r in episodes])),
        "tool_calls/per_episode": float(
            np.mean([sum(len(t["tool_calls"]) for t in r["turns"]) for r in episodes])
        ),
        "tool_calls/rate": float(np.mean([bool(t["tool_calls"]) for t in turns])),
        "tool_calls/episodes_with_call": float(
            np.mean([any(t["tool_calls"] for t in r["turns"]) for r in episodes])
        ),
    }
    for k in range(max(len(r["turns"]) for r in episodes)):
        rewards = [r["turns"][k]["reward"] for r in episodes if len(r["turns"]) > k]
        rewards = [x for x in rewards if x is not None]
        if rewards:
            out[f"reward/turn_{k + 1}"] = float(np.mean(rewards))
    return out
