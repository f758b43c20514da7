"""`ToolEnv`: any environment, with tools the model may call before it answers.

    env = ToolEnv(vlmgym_envs.make("osv5m"), [zoom_tool()], max_calls=3, first_view_side=256)

Episode:

- `reset`: the wrapped env's messages, with the tools rendered into the system message the
  way Qwen's chat templates render `tools=` (`tools.tools_prompt`): the wrapped env's
  system text (or `system_prompt`, default Qwen2.5-VL's "You are a helpful assistant.")
  followed by the tools block. With `first_view_side`, the images shown are downscaled to
  that longer side (box filter) while tools read them at full resolution.
- `step` on a reply holding `<tool_call>`: each call is checked and run (in a worker
  thread, at most `timeout_s` seconds each) while the episode's budget of `max_calls`
  lasts; the results come back as ONE user message (`tools.tool_response_message`) with
  reward 0 and done=False. Every problem (malformed call, unknown tool, bad arguments, a
  raising or slow tool, a used-up budget) becomes an error text the model reads and a count
  in `info["tool_errors"]`, never an exception. Every call counts against the budget,
  malformed ones included. Calls beyond the budget get a "budget" error; a reply after that
  notice ends the episode whatever it holds.
- `step` on a reply without `<tool_call>`: the final answer; the wrapped env scores it and
  the reward is its reward minus `call_cost` times the calls made (a negative `call_cost`
  is a bonus per call that ran without an error, bounded by `max_calls`: a shaping aid for
  learning from scratch that malformed calls cannot collect).
  A wrapped multi-turn env may continue the episode as it would without tools.

A slow tool cannot be stopped (Python threads cannot be killed): after `timeout_s` the model
is told the call timed out and the thread finishes in the background, its result dropped.

Info of every step: the wrapped env's info (final step), plus `tool_calls` (calls made so
far), `tool_errors` ({kind: count} so far, `tools.ERROR_KINDS`), `turns` (replies so far)
and, on tool turns, `tool_results` ([{"name", "error", "images": [[w, h], ...]}]).
`metrics` and `step_metrics` add `tool/call_rate` (share of episodes with a call),
`tool/calls_per_episode`, `tool/turns_per_episode`, `tool/error_rate` (errors per call) and
the wrapped env's info means split by whether the episode called a tool
(`tool/called/<key>`, `tool/direct/<key>`) to the wrapped env's own.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from vlmgym_envs.core import Env, Message, Observation, StepResult, as_text
from vlmgym_envs.tools import (
    CallError,
    Tool,
    ToolArgumentError,
    ToolCall,
    ToolContext,
    check_arguments,
    output_parts,
    parse_tool_calls,
    tool_response_message,
    tools_prompt,
)
from vlmgym_envs.zoom import downscale

DEFAULT_SYSTEM = "You are a helpful assistant."
MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class ToolState:
    """One episode of a `ToolEnv`.

    inner: the wrapped env's state.
    images: the episode's images at full resolution, for the tools.
    calls: tool calls made so far (malformed ones included).
    ran: the calls among them that ran without an error.
    turn: replies stepped so far.
    errors: (kind, count) pairs of the errors so far, sorted by kind.
    exhausted: the model was told its budget is used up.
    """

    inner: Any
    images: tuple[Image.Image, ...] = ()
    calls: int = 0
    ran: int = 0
    turn: int = 0
    errors: tuple[tuple[str, int], ...] = ()
    exhausted: bool = False

    def error_counts(self) -> dict[str, int]:
        """{kind: count} of the errors so far."""
        return dict(self.errors)


class ToolEnv(Env[ToolState]):
    """Wrap `env` so the model may call `tools` before answering (see the module docstring).

    env: the environment that shows the task and scores the final answer.
    tools: the tools, by distinct names.
    max_calls: calls allowed per episode.
    timeout_s: seconds one call may run.
    call_cost: subtracted from the final reward per call made; a negative one (a bonus)
        counts only the calls that ran without an error.
    first_view_side: when set, the longer side of the images first shown.
    system_prompt: the system text when `env` shows none.
    phrases: complete call strings (`tools.format_tool_call`) a tiny word-level tokenizer
        should give one token each (`tool_phrases`).
    """

    def __init__(
        self,
        env: Env[Any],
        tools: Sequence[Tool],
        *,
        max_calls: int = 4,
        timeout_s: float = 10.0,
        call_cost: float = 0.0,
        first_view_side: int | None = None,
        system_prompt: str = DEFAULT_SYSTEM,
        phrases: Sequence[str] = (),
    ) -> None:
        names = [t.name for t in tools]
        if not tools or len(set(names)) != len(names):
            raise ValueError(f"tools must be non-empty with distinct names, got {names}")
        if max_calls < 0 or not timeout_s > 0 or not math.isfinite(call_cost):
            raise ValueError("need max_calls >= 0, timeout_s > 0 and a finite call_cost")
        if first_view_side is not None and first_view_side < 1:
            raise ValueError(f"first_view_side must be >= 1, got {first_view_side}")
        self.env = env
        self.tools: dict[str, Tool] = {t.name: t for t in tools}
        self.max_calls = max_calls
        self.timeout_s = float(timeout_s)
        self.call_cost = float(call_cost)
        self.first_view_side = first_view_side
        self.system_prompt = system_prompt
        self.phrases = tuple(phrases)

    def __len__(self) -> int:
        return len(self.env)

    def tool_phrases(self) -> tuple[str, ...]:
        """Whole call strings a word-level tokenizer gives one token each (tiny models)."""
        return self.phrases

    def answer_vocabulary(self) -> tuple[str, ...]:
        """The wrapped env's answer words, when it or its module declares them (else none)."""
        vocabulary = getattr(self.env, "answer_vocabulary", None) or getattr(
            sys.modules.get(type(self.env).__module__), "answer_vocabulary", None
        )
        return tuple(vocabulary()) if callable(vocabulary) else ()

    # Episodes ---------------------------------------------------------------------------

    def reset(self, idx: int) -> tuple[ToolState, Observation]:
        inner, obs = self.env.reset(idx)
        images = tuple(obs.images)
        messages = list(obs.messages)
        if self.first_view_side is not None:
            side = self.first_view_side
            messages = [_map_images(m, lambda im: downscale(im, side)) for m in messages]
        system = self.system_prompt
        if messages and messages[0].get("role") == "system":
            system = Observation([messages.pop(0)]).text
        text = system + tools_prompt(list(self.tools.values()))
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": text}]})
        return ToolState(inner=inner, images=images), Observation(messages)

    def step(self, state: ToolState, text: str) -> StepResult[ToolState]:
        text = as_text(text)
        parsed = parse_tool_calls(text)
        if not parsed or state.exhausted:
            return self._final(state, text)
        context = ToolContext(images=state.images, state=state.inner)
        errors = state.error_counts()
        calls, ran = state.calls, state.ran
        results: list[list[dict[str, Any]]] = []
        summary: list[dict[str, Any]] = []
        for item in parsed.items:
            outcome: list[dict[str, Any]] | CallError = item if isinstance(item, CallError) else []
            if calls >= self.max_calls:
                outcome = CallError(
                    "budget",
                    f"the tool-call budget of {self.max_calls} calls is used up; "
                    "answer now without calling a tool",
                    item.name,
                )
            else:
                calls += 1
                if isinstance(item, ToolCall):
                    outcome = self._run(item, context)
            if isinstance(outcome, CallError):
                errors[outcome.kind] = errors.get(outcome.kind, 0) + 1
                text_part = {"type": "text", "text": f"Error ({outcome.kind}): {outcome.message}"}
                results.append([text_part])
                summary.append({"name": item.name, "error": outcome.kind, "images": []})
            else:
                ran += 1
                sizes = [list(p["image"].size) for p in outcome if p.get("type") == "image"]
                results.append(outcome)
                summary.append({"name": item.name, "error": None, "images": sizes})
        new_state = dataclasses.replace(
            state,
            calls=calls,
            ran=ran,
            turn=state.turn + 1,
            errors=tuple(sorted(errors.items())),
            exhausted=any(e["error"] == "budget" for e in summary),
        )
        info = self._info(new_state, {})
        info["tool_results"] = summary
        observation = Observation([tool_response_message(results)])
        return StepResult(0.0, False, info, observation, new_state)

    def _run(self, call: ToolCall, context: ToolContext) -> list[dict[str, Any]] | CallError:
        """Check and run one call; its content parts, or the error."""
        tool = self.tools.get(call.name)
        if tool is None:
            known = ", ".join(sorted(self.tools))
            return CallError("unknown_tool", f"no tool named {call.name!r}; tools: {known}")
        problems = check_arguments(tool.parameters, call.arguments)
        if problems:
            return CallError("bad_arguments", "; ".join(problems[:5]), call.name)
        outcome = run_with_timeout(tool, call.arguments, context, self.timeout_s)
        if isinstance(outcome, CallError):
            return outcome
        try:
            return output_parts(outcome)
        except TypeError as e:
            return CallError("bad_output", str(e), call.name)

    def _final(self, state: ToolState, text: str) -> StepResult[ToolState]:
        """Score `text` as the answer with the wrapped env."""
        result = self.env.step(state.inner, text)
        inner = result.state if result.state is not None else state.inner
        new_state = dataclasses.replace(state, inner=inner, turn=state.turn + 1)
        info = self._info(new_state, result.info)
        if result.done:
            counted = state.calls if self.call_cost >= 0 else state.ran
            reward = float(result.reward) - self.call_cost * counted
            return StepResult(reward, True, info, None, None)
        if result.observation is not None:
            extra = tuple(result.observation.images)
            new_state = dataclasses.replace(new_state, images=state.images + extra)
        return StepResult(float(result.reward), False, info, result.observation, new_state)

    def _info(self, state: ToolState, inner_info: Mapping[str, Any]) -> dict[str, Any]:
        info = dict(inner_info)
        info["tool_calls"] = state.calls
        info["tool_errors"] = state.error_counts()
        info["turns"] = state.turn
        return info

    # What the wrapped env keeps -----------------------------------------------------------

    def skipped(self) -> dict[str, int]:
        return self.env.skipped()

    def state_dict(self) -> dict[str, Any]:
        return self.env.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.env.load_state_dict(state)

    # Metrics ----------------------------------------------------------------------------

    def metrics(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """The wrapped env's metrics (records unwrapped to its state) and `tool_metrics`."""
        out = dict(self.env.metrics(_inner_records(records)))
        out.update(tool_metrics([r.get("info") for r in records]))
        return out

    def step_metrics(self, infos: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """The wrapped env's step metrics and `tool_metrics`."""
        out = dict(self.env.step_metrics(infos))
        out.update(tool_metrics(infos))
        return out

    def plots(self, records: Sequence[Mapping[str, Any]], out_dir: Path) -> list[Path]:
        return self.env.plots(_inner_records(records), out_dir)


def run_with_timeout(
    tool: Tool, arguments: Mapping[str, Any], context: ToolContext, timeout_s: float
) -> Any:
    """`tool(arguments, context)` in a daemon thread; its output, or a `CallError` when it
    raised or ran longer than `timeout_s` (the thread is then left to finish)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["out"] = tool(arguments, context)
        except ToolArgumentError as e:
            box["err"] = CallError("bad_arguments", str(e)[:MAX_ERROR_CHARS], tool.name)
        except Exception as e:  # any tool failure is reported to the model
            message = f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS]
            box["err"] = CallError("exception", message, tool.name)

    thread = threading.Thread(target=target, name=f"tool-{tool.name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return CallError("timeout", f"{tool.name} took longer than {timeout_s:g} s", tool.name)
    return box["err"] if "err" in box else box.get("out")


def _map_images(message: Message, fn: Any) -> Message:
    content = message.get("content")
    if isinstance(content, str) or not content:
        return message
    parts = [
        {**part, "image": fn(part["image"])} if part.get("type") == "image" else part
        for part in content
    ]
    return {**message, "content": parts}


def _inner_records(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Evaluation records with each `state` replaced by the wrapped env's state."""
    out = []
    for r in records:
        state = r.get("state")
        inner = state.get("inner", state) if isinstance(state, Mapping) else state
        out.append({**r, "state": inner})
    return out


def _number(value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return 0.0


def tool_metrics(infos: Sequence[Mapping[str, Any] | None]) -> dict[str, float]:
    """Tool use over episodes' final infos: `tool/call_rate`, `tool/calls_per_episode`,
    `tool/turns_per_episode`, `tool/error_rate`, and what a call bought: the mean of each of
    the wrapped env's numeric info values (`correct`, `format_ok`...) over the episodes that
    called a tool, `tool/called/<key>`, and over those that answered directly,
    `tool/direct/<key>` (each only when that share is not empty). Empty for no infos; never
    raises."""
    rows = [info for info in infos if isinstance(info, Mapping)]
    if not rows:
        return {}
    calls = [_number(r.get("tool_calls")) for r in rows]
    turns = [_number(r.get("turns")) for r in rows]
    errors = [
        sum(_number(v) for v in r["tool_errors"].values())
        for r in rows
        if isinstance(r.get("tool_errors"), Mapping)
    ]
    n = len(rows)
    out = {
        "tool/call_rate": sum(c > 0 for c in calls) / n,
        "tool/calls_per_episode": sum(calls) / n,
        "tool/turns_per_episode": sum(turns) / n,
        "tool/error_rate": sum(errors) / max(sum(calls), 1.0),
    }
    called = [c > 0 for c in calls]
    for share, part in (
        ("called", [r for r, yes in zip(rows, called, strict=True) if yes]),
        ("direct", [r for r, yes in zip(rows, called, strict=True) if not yes]),
    ):
        values: dict[str, list[float]] = {}
        for r in part:
            for key, value in r.items():
                if key not in _TOOL_KEYS and _is_number(value):
                    values.setdefault(str(key), []).append(float(value))
        out.update({f"tool/{share}/{k}": sum(v) / len(v) for k, v in values.items()})
    return out


_TOOL_KEYS = frozenset({"tool_calls", "tool_errors", "turns", "tool_results"})


def _is_number(value: Any) -> bool:
    return isinstance(value, bool | int | float) and math.isfinite(value)
