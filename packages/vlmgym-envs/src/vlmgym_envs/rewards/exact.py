"""The `exact` reward: the final answer equals the gold text after normalisation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlmgym_envs.core import as_text
from vlmgym_envs.rewards.extract import answer_scope, final_answer, normalize_text
from vlmgym_envs.rewards.inputs import completions_list, require_column, score_each
from vlmgym_envs.rewards.registry import register_reward

MAX_EXACT_CHARS = 2000  # a longer answer is not compared (it scores 0)


def _gold_texts(cell: object) -> list[str]:
    """The acceptable answers in a gold cell: a list/tuple of them, or one."""
    values = cell if isinstance(cell, list | tuple) else [cell]
    texts = []
    for value in values:
        if value is None:
            continue
        text = as_text(value)
        texts.append(final_answer(text) or text)
    return texts


def exact_answer(text: str) -> str | None:
    """The answer `exact` compares: `final_answer(text)`, else the whole answer scope (the
    `<answer>` block, or the whole completion when it has no marked answer)."""
    answer = final_answer(text)
    if answer is None:
        answer = answer_scope(text)[0]
    return answer


@register_reward("exact")
def exact_reward(completions: Sequence[Any], **columns: Any) -> list[float]:
    """1.0 when the final answer equals the gold answer after `normalize_text`, else 0.0.

    Columns: `answer`, a string (its own final answer when it marks one, "Answer: Paris")
    or a list of acceptable strings (VQA-style: any one matches).
    The completion's answer is its final answer (`\\boxed{}`, "Answer: ...", the `<answer>`
    block) or, without one, the whole completion: "Paris." and "**paris**" both answer
    "Paris". Normalisation: NFKC, case-folded, whitespace collapsed, `\\text{}`-like
    commands unwrapped, `$` dropped, surrounding punctuation, quotes and brackets stripped.
    An empty answer never matches; answers over 2,000 characters score 0.
    """
    items = completions_list("exact", completions)
    golds = require_column("exact", columns, "answer", len(items))

    def score(text: str, gold: object) -> float:
        answer = exact_answer(text)
        if answer is None or len(answer) > MAX_EXACT_CHARS:
            return 0.0
        normalized = normalize_text(answer)
        accepted = {normalize_text(g) for g in _gold_texts(gold)}
        return float(bool(normalized) and normalized in accepted)

    return score_each("exact", score, items, golds)
