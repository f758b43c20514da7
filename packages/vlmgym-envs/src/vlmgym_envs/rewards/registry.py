"""Named reward functions, their weighted sums, and the forms a config may name them in.

@register_reward("short")
def short(completions, **columns):
    return [float(len(c) < 200) for c in completions]

reward = resolve_reward({"math": 1.0, "format": 0.1})   # the command line's JSON form
scores = reward(completions, answer=answers)             # list[float], one per completion
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

RewardFn = Callable[..., list[float]]
"""`fn(completions: list[str], **columns: list[Any]) -> list[float]`, one score per completion."""

F = TypeVar("F", bound=RewardFn)

REWARDS: dict[str, RewardFn] = {}
"""Registered rewards by lower-case name (`register_reward` adds to it)."""


def _key(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a reward name is a non-empty string, got {name!r}")
    return name.strip().lower()


def register_reward(name: str, *, overwrite: bool = False) -> Callable[[F], F]:
    """Decorator registering a reward under `name` (case-insensitive).

    A taken name raises ValueError unless `overwrite=True`. The function is returned
    unchanged.
    """
    key = _key(name)

    def decorator(fn: F) -> F:
        if not callable(fn):
            raise TypeError(f"reward {name!r} must be callable, got {type(fn).__name__}")
        if key in REWARDS and not overwrite:
            raise ValueError(f"reward name {key!r} is taken; pass overwrite=True")
        REWARDS[key] = fn
        return fn

    return decorator


def get_reward(name: str) -> RewardFn:
    """The reward registered under `name` (any case).

    An unregistered `"package.module:function"` is imported, so a command line can name a
    reward no imported module registered. Unknown names raise ValueError listing the
    registered ones.
    """
    key = _key(name)
    if key in REWARDS:
        return REWARDS[key]
    if ":" in name:
        module_name, _, attribute = name.strip().partition(":")
        fn = getattr(importlib.import_module(module_name), attribute)
        if not callable(fn):
            raise TypeError(f"{name} is not callable")
        return fn
    raise ValueError(f"no reward named {name!r}; registered: {', '.join(sorted(REWARDS))}")


REWARD_FACTORIES: dict[str, str] = {"judge": "vlmgym_train.judge:ModelJudge"}
"""Rewards built from options, by name -> "module:callable" (imported on use): a config
names one with its options, `{"judge": {"model_dir": "...", "rubric": "...", "weight": 1}}`."""


def make_reward(name: str, options: Mapping[str, Any]) -> tuple[RewardFn, float]:
    """A reward built by the factory `name` (`REWARD_FACTORIES`, or "module:callable") from
    `options`, and its weight (`options["weight"]`, default 1)."""
    kwargs = dict(options)
    weight = kwargs.pop("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise ValueError(f"reward {name!r}: weight must be a number, got {weight!r}")
    spec = REWARD_FACTORIES.get(_key(name), name.strip())
    if ":" not in spec:
        known = ", ".join(sorted(REWARD_FACTORIES))
        raise ValueError(f"no reward factory named {name!r}; known: {known}, or module:callable")
    module_name, _, attribute = spec.partition(":")
    factory = getattr(importlib.import_module(module_name), attribute)
    try:
        return factory(**kwargs), float(weight)
    except TypeError as err:
        raise ValueError(f"reward {name!r}: {err}") from None


def _reward_name(fn: RewardFn) -> str:
    for name, registered in REWARDS.items():
        if registered is fn:
            return name
    return getattr(fn, "__name__", type(fn).__name__)


def combine(rewards: Sequence[RewardFn | str], weights: Sequence[float] | None = None) -> RewardFn:
    """The weighted sum `sum_i w_i * r_i(completions, **columns)` of rewards (or names).

    Weights default to 1 and must be finite (negative ones are allowed: a penalty). Every
    registered reward lies in [0, 1], so a sum lies in [sum of the negative weights, sum of
    the positive weights]: `{"math": 1, "format": 0.1}` gives values in [0, 1.1]. Each
    reward gets all the columns; a reward returning the wrong number of scores raises
    ValueError. The result's `components` is a tuple of `(name, weight, fn)`.
    """
    if isinstance(rewards, str) or callable(rewards):
        rewards = [rewards]
    fns = [get_reward(r) if isinstance(r, str) else r for r in rewards]
    if not fns:
        raise ValueError("combine needs at least one reward")
    for fn in fns:
        if not callable(fn):
            raise TypeError(f"a reward must be a name or a callable, got {type(fn).__name__}")
    ws = [1.0] * len(fns) if weights is None else [float(w) for w in weights]
    if len(ws) != len(fns):
        raise ValueError(f"{len(fns)} rewards but {len(ws)} weights")
    if not all(math.isfinite(w) for w in ws):
        raise ValueError(f"reward weights must be finite, got {ws}")
    names = [_reward_name(fn) for fn in fns]

    def combined(completions: Sequence[Any], **columns: Any) -> list[float]:
        total = [0.0] * len(completions)
        for name, w, fn in zip(names, ws, fns, strict=True):
            scores = fn(completions, **columns)
            if len(scores) != len(total):
                raise ValueError(
                    f"reward {name!r} returned {len(scores)} scores for {len(total)} completions"
                )
            total = [t + w * float(s) for t, s in zip(total, scores, strict=True)]
        return total

    combined.__name__ = " + ".join(f"{w:g}*{n}" for n, w in zip(names, ws, strict=True))
    combined.__doc__ = f"Weighted sum of rewards: {combined.__name__}."
    combined.components = tuple(zip(names, ws, fns, strict=True))  # type: ignore[attr-defined]
    return combined


def resolve_reward(spec: Any) -> RewardFn:
    """A reward from a config value:

    - a name, `"math"` (any case, or `"module:function"`), see `get_reward`;
    - a callable, returned as is;
    - a list of names or callables: their sum (weights 1); a one-element list is that reward;
    - a mapping `{name: weight}`: the weighted sum (`combine`); a value that is itself a
      mapping builds the reward `name` from options (`make_reward`: `{"judge": {...}}`);
    - a string holding JSON of one of these, `'{"math": 1.0, "format": 0.1}'`, as a command
      line passes it.

    Unknown names raise ValueError; other types raise TypeError.
    """
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith(("{", "[", '"')):
            try:
                decoded = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"reward spec {spec!r} is not valid JSON: {e}") from None
            return resolve_reward(decoded)
        return get_reward(text)
    if callable(spec):
        return spec
    if isinstance(spec, Mapping):
        fns: list[RewardFn | str] = []
        weights: list[float] = []
        for name, value in spec.items():
            if not isinstance(name, str):
                raise TypeError(f"reward weights are keyed by name, got key {name!r}")
            if isinstance(value, Mapping):  # a factory with its options
                fn, weight = make_reward(name, value)
                fns.append(fn)
                weights.append(weight)
            else:
                fns.append(name)
                weights.append(value)
        return combine(fns, weights)
    if isinstance(spec, list | tuple):
        if len(spec) == 1:
            return resolve_reward(spec[0])
        return combine([r if callable(r) else _name(r) for r in spec])
    raise TypeError(f"cannot make a reward of {type(spec).__name__}: {spec!r}")


def _name(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"a reward in a list is a name or a callable, got {value!r}")
    return value
