"""The reward of a `DatasetEnv`: a spec split into weighted parts, each called TRL-style.

A spec is a name the rewards library resolves (`vlmgym_envs.rewards.resolve_reward`), a
callable, a list of them (their sum), a dict {name or callable: weight} (the weighted sum)
or such a list or dict as a JSON string. Each part is called batched,
`fn(completions: list[str], **columns: list[Any]) -> list[float]`; `call_reward` retries a
batch that fails one completion at a time and reports, per completion, the one-line error
that made it 0, so a reward's bug never stops a run.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

RewardFn = Callable[..., Sequence[float | None]]
"""`fn(completions: list[str], **columns: list[Any]) -> list[float]` (TRL-style, batched)."""
FORMAT_REWARDS = frozenset({"format", "boxed_format"})
GOLD_REWARDS = frozenset({"math", "choice", "exact", "numeric"})
"""Named rewards that compare with the `answer` column."""
CORRECT_AT = 1.0 - 1e-9
REWARD_REQUIRED = (
    "reward= is required: a name (math, choice, exact, numeric, format, boxed_format), a "
    "callable fn(completions, **columns) -> list[float], a list of them, or a dict "
    "{name: weight}"
)


@dataclass(frozen=True)
class RewardPart:
    """One reward of the (possibly combined) reward: `weight * fn(...)`.

    columns: the columns `fn` takes, or None when it takes any (`**kwargs`).
    named: whether the spec named a library reward (else it gave a callable).
    """

    name: str
    weight: float
    fn: RewardFn
    columns: frozenset[str] | None
    named: bool = False


def reward_parts(spec: Any) -> list[RewardPart]:
    """The parts of a reward spec (see the module docstring); names are resolved now by
    `vlmgym_envs.rewards.resolve_reward`."""
    if spec is None:
        raise ValueError(REWARD_REQUIRED)
    if isinstance(spec, str) and spec.strip().startswith(("{", "[")):
        try:
            spec = json.loads(spec)  # the command line's form: '{"math": 1, "format": 0.1}'
        except json.JSONDecodeError as e:
            raise ValueError(f"reward spec {spec!r} is not valid JSON: {e}") from None
    if isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, list | tuple):
        items = [(s, 1.0) for s in spec]
    else:
        items = [(spec, 1.0)]
    if not items:
        raise ValueError(REWARD_REQUIRED)
    parts: list[RewardPart] = []
    for s, weight in items:
        if isinstance(s, str) and isinstance(weight, Mapping):  # {"judge": {options}}
            from vlmgym_envs.rewards import make_reward

            fn, weight = make_reward(s, weight)
            parts.append(RewardPart(s.strip().lower(), weight, fn, accepted_columns(fn), True))
            continue
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ValueError(f"reward weight for {s!r} must be a number, got {weight!r}")
        if not math.isfinite(weight):
            raise ValueError(f"reward weight for {s!r} must be finite, got {weight}")
        if isinstance(s, str):
            fn, name = named_reward(s), s.strip().lower()
        elif callable(s):
            fn, name = s, getattr(s, "__name__", type(s).__name__)
        else:
            raise TypeError(f"a reward is a name or a callable, got {type(s).__name__}")
        taken = {p.name for p in parts}
        unique = name
        while unique in taken:
            unique += "_"
        named = isinstance(s, str)
        parts.append(RewardPart(unique, float(weight), fn, accepted_columns(fn), named))
    return parts


def named_reward(name: str) -> RewardFn:
    try:  # imported on use: only a named reward needs the rewards library
        from vlmgym_envs.rewards import resolve_reward
    except ImportError as e:
        raise ImportError(
            f"reward {name!r} is a name, and vlmgym_envs.rewards cannot resolve names ({e}); "
            "pass a callable"
        ) from e
    return resolve_reward(name)


def accepted_columns(fn: RewardFn) -> frozenset[str] | None:
    """The keyword columns `fn` takes after `completions`, or None for any (`**kwargs`)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(p.name for p in params[1:] if p.kind in keyword)


def required_columns(fn: RewardFn) -> list[str]:
    try:
        params = list(inspect.signature(fn).parameters.values())[1:]
    except (TypeError, ValueError):
        return []
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in keyword and p.default is inspect.Parameter.empty]


def _one_line(name: str, err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{name}: {type(err).__name__}: {text}"[:300]


def _checked(values: Any, n: int) -> list[float | None]:
    """`values` as n finite floats (None kept), or ValueError."""
    if isinstance(values, str | bytes) or not hasattr(values, "__len__") or len(values) != n:
        raise ValueError(f"returned {str(values)[:80]!r}, not a list of {n} numbers")
    out: list[float | None] = []
    for v in values:
        if v is None:
            out.append(None)
            continue
        if hasattr(v, "item") and getattr(v, "ndim", None) == 0:
            v = v.item()
        if not isinstance(v, int | float) or not math.isfinite(float(v)):
            raise ValueError(f"returned {v!r}, not a finite number")
        out.append(float(v))
    return out


def call_reward(
    part: RewardPart, texts: list[str], columns: dict[str, list[Any]]
) -> tuple[list[float | None], list[str | None]]:
    """One batched call of `part` (each completion alone when the batch fails): its values
    and, per completion, the one-line error that made it 0."""
    n = len(texts)
    try:
        return _checked(part.fn(list(texts), **columns), n), [None] * n
    except Exception as err:  # a reward's bug must not stop training: score 0 and say why
        if n == 1:
            return [0.0], [_one_line(part.name, err)]
    values: list[float | None] = []
    errors: list[str | None] = []
    for i in range(n):
        v, e = call_reward(part, texts[i : i + 1], {k: c[i : i + 1] for k, c in columns.items()})
        values += v
        errors += e
    return values, errors
