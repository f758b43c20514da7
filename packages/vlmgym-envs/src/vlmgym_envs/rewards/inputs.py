"""What a batched reward reads: completions as text and the dataset columns it needs.

A reward is called as `fn(completions, **columns)`, TRL's convention: `completions` is a
list (one entry per sampled completion) and each column a list aligned with it, holding
the value of the dataset row each completion answers (`answer=[...]`, `choices=[...]`).
TRL also passes `prompts`, `completion_ids` and `trainer_state`; a reward ignores what it
does not read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vlmgym_envs.core import as_text

logger = logging.getLogger(__name__)


def completion_text(completion: object) -> str:
    """A completion as text: a string as is; a chat completion (TRL's conversational form,
    a list of `{"role", "content"}` messages, or one such message) as the text of its last
    message; None as ""; anything else as `str()` of it. Never raises."""
    try:
        if isinstance(completion, str):
            return completion
        if isinstance(completion, Mapping):
            return _content_text(completion.get("content"))
        if isinstance(completion, list | tuple) and completion:
            last = completion[-1]
            if isinstance(last, Mapping):
                return _content_text(last.get("content"))
        return as_text(completion)
    except Exception:  # a hostile __str__ or mapping: the completion reads as empty
        logger.warning("a completion could not be read as text", exc_info=True)
        return ""


def _content_text(content: object) -> str:
    """Message content as text: a string, or the text parts of a list of parts."""
    if isinstance(content, list | tuple):
        return "".join(
            as_text(part.get("text"))
            for part in content
            if isinstance(part, Mapping) and part.get("type", "text") == "text"
        )
    return as_text(content)


def completions_list(reward: str, completions: object) -> list[object]:
    """`completions` as a list; a string or non-sequence is a caller's error (TypeError)."""
    if isinstance(completions, str | bytes) or not isinstance(completions, Sequence):
        raise TypeError(
            f"reward {reward!r} takes a list of completions, got {type(completions).__name__}"
        )
    return list(completions)


def require_column(
    reward: str, columns: Mapping[str, Any], name: str, n: int, *, alternatives: Sequence[str] = ()
) -> list[Any]:
    """The column `name` (or the first of `alternatives` present) as a list of `n` values.

    Raises ValueError naming the reward, the column and the columns the row has when it is
    missing, and when its length differs from the number of completions.
    """
    for key in (name, *alternatives):
        if columns.get(key) is not None:
            return column_values(reward, columns, key, n)
    wanted = repr(name) + "".join(f" (or {a!r})" for a in alternatives)
    have = ", ".join(sorted(columns)) or "no columns"
    raise ValueError(f"reward {reward!r} needs the column {wanted}; the row has: {have}")


def optional_column(reward: str, columns: Mapping[str, Any], name: str, n: int) -> list[Any]:
    """The column `name` as a list of `n` values, or `n` Nones when the row lacks it."""
    if columns.get(name) is None:
        return [None] * n
    return column_values(reward, columns, name, n)


def column_values(reward: str, columns: Mapping[str, Any], name: str, n: int) -> list[Any]:
    """Column `name` as a list, checked to hold one value per completion."""
    value = columns[name]
    if isinstance(value, str | bytes) or not hasattr(value, "__len__"):
        raise ValueError(
            f"reward {reward!r}: column {name!r} must be a list with one value per "
            f"completion, got {type(value).__name__}"
        )
    values = list(value)
    if len(values) != n:
        raise ValueError(
            f"reward {reward!r}: column {name!r} has {len(values)} values for {n} completions"
        )
    return values


def score_each(
    reward: str, score: Callable[..., float], completions: Sequence[object], *cols: Sequence[Any]
) -> list[float]:
    """`[score(text, *row values) for each completion]`, where text is the completion's text.

    A score that raises counts 0.0 and is logged as a warning with its traceback: a bug in
    a reward must not stop a training run, but it must be seen.
    """
    out = []
    for completion, *values in zip(completions, *cols, strict=True):
        try:
            out.append(float(score(completion_text(completion), *values)))
        except Exception:  # the reward's own bug, logged; see the docstring
            logger.warning("reward %r failed on one completion; scored 0.0", reward, exc_info=True)
            out.append(0.0)
    return out
