"""The `math` reward: the final answer is mathematically equal to the gold one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlmgym_envs.core import as_text
from vlmgym_envs.rewards.extract import clean_answer, final_answer
from vlmgym_envs.rewards.inputs import completion_text, completions_list, require_column
from vlmgym_envs.rewards.registry import RewardFn, register_reward
from vlmgym_envs.rewards.verifier import MathVerifier, default_verifier


def gold_answer(value: object) -> str | None:
    """The gold answer in a dataset cell: its final answer when it marks one (`\\boxed{}`
    in a MATH solution, "#### 72" in a GSM8K answer, "Answer: ..."), else the whole cell
    (`"\\frac{1}{2}"`, `0.5`), cleaned of `$` delimiters. None for an empty cell."""
    if value is None:
        return None
    text = as_text(value)
    return final_answer(text) or clean_answer(text) or None


def make_math_reward(verifier: MathVerifier | None = None) -> RewardFn:
    """The `math` reward deciding equality with `verifier` (default: `default_verifier()`,
    shared by the process), e.g. `make_math_reward(MathVerifier(timeout_s=10, workers=8))`.
    """

    def math_reward(completions: Sequence[Any], **columns: Any) -> list[float]:
        """1.0 when the completion's final answer is mathematically equal to the gold one,
        else 0.0.

        Columns: `answer` (the gold answer, or a text marking it), or else `solution` (a
        worked solution; its last `\\boxed{}` or final-answer line is the gold).
        The model's answer is `extract.final_answer`: the last `\\boxed{...}`, else the
        last final-answer line ("Answer: X", "The final answer is $X$"), else the
        `<answer>` block; a completion without one scores 0 (a bare number at the end of
        the reasoning does not count).
        Equality is math-verify's (`verify(parse(gold), parse(pred))`): `\\frac{1}{2}`,
        `0.5`, `1/2` and `50\\%` are equal; `2` and `3` are not; `x = 2` equals `2` (an
        assignment is compared by its right side); sets ignore order, tuples do not;
        integers are compared exactly, decimals to 6 places. Answers over 2,000
        characters, exponent towers and other costly forms score 0 unevaluated, and a
        pair undecided after the verifier's timeout (3 s) scores 0 (`verifier.py`).
        """
        items = completions_list("math", completions)
        golds = require_column("math", columns, "answer", len(items), alternatives=("solution",))
        pairs, where = [], []
        for i, (completion, gold_cell) in enumerate(zip(items, golds, strict=True)):
            pred = final_answer(completion_text(completion))
            gold = gold_answer(gold_cell)
            if pred is not None and gold is not None:
                pairs.append((gold, pred))
                where.append(i)
        scores = [0.0] * len(items)
        verdicts = (verifier or default_verifier()).equal_many(pairs)
        for i, equal in zip(where, verdicts, strict=True):
            scores[i] = float(equal)
        return scores

    return math_reward


math_reward = register_reward("math")(make_math_reward())
