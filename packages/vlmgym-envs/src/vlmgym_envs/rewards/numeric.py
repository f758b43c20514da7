"""The `numeric` reward: the final number is within a tolerance of the gold number."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vlmgym_envs.core import as_text
from vlmgym_envs.rewards.extract import answer_scope, final_answer
from vlmgym_envs.rewards.inputs import completions_list, require_column, score_each
from vlmgym_envs.rewards.registry import RewardFn, register_reward

DEFAULT_REL_TOL = 1e-4
DEFAULT_ABS_TOL = 1e-9

_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
# A minus sign counts unless it follows a word, digit or bracket ("5-3", "x - 3").
_SIGNED = rf"(?:(?<![\w.)\]}}])[-\u2212])?(?:{_UNSIGNED})"
_NUMBER = re.compile(
    rf"\\[dt]?frac\s*\{{\s*(?P<fn>{_SIGNED})\s*\}}\s*\{{\s*(?P<fd>{_SIGNED})\s*\}}"
    # Not an exponent or subscript (`cm^2`, `x_1`, `10^{3}`) nor inside a word or number.
    rf"|(?<![\w.^_])(?<!\^\{{)(?<!_\{{)(?P<n>{_SIGNED})(?:\s*/\s*(?P<d>{_SIGNED}))?"
    rf"(?:[eE](?P<e>[-+]?\d{{1,4}})(?!\d)"
    rf"|\s*(?:\\times|\\cdot|\u00d7|\*)\s*10\s*\^\s*\{{?\s*(?P<e10>[-+\u2212]?\d{{1,4}})\s*\}}?)?"
    rf"(?P<pct>\s*(?:\\?%|percent\b))?"
)


@dataclass(frozen=True)
class Number:
    """A number read from text: its value, whether a `%` followed it, and whether it was
    written as an integer (no decimal point, fraction or exponent)."""

    value: float
    percent: bool
    integer: bool


def _float(text: str) -> float:
    return float(text.replace(",", "").replace("\u2212", "-"))


def _number(m: re.Match[str]) -> Number | None:
    if m.group("fn") is not None:
        numerator, denominator = _float(m.group("fn")), _float(m.group("fd"))
    else:
        numerator = _float(m.group("n"))
        denominator = _float(m.group("d")) if m.group("d") is not None else 1.0
    if denominator == 0:
        return None
    exponent = m.group("e") or m.group("e10")
    value = numerator / denominator
    if exponent is not None:
        value *= 10.0 ** int(exponent.replace("\u2212", "-"))
    if not math.isfinite(value):
        return None
    integer = (
        m.group("fn") is None and m.group("d") is None and exponent is None and "." not in m["n"]
    )
    return Number(value, m.group("pct") is not None, integer)


def last_number(text: object) -> Number | None:
    """The last number in `text`: `-1,234.5`, `3/4`, `\\frac{3}{4}`, `1.5e3`,
    `1.5 \\times 10^{3}`, `25\\%`; exponents and subscripts (`cm^2`, `x_1`) are skipped."""
    last = None
    for m in _NUMBER.finditer(as_text(text)):
        number = _number(m)
        if number is not None:
            last = number
    return last


def _close(pred: float, gold: float, abs_tol: float, rel_tol: float) -> bool:
    return abs(pred - gold) <= max(abs_tol, rel_tol * abs(gold))


def numbers_match(pred: Number, gold: Number, abs_tol: float, rel_tol: float) -> bool:
    """Two integers must be equal; otherwise `|pred - gold| <= max(abs_tol, rel_tol |gold|)`.
    When exactly one side carries `%`, that side divided by 100 may match instead."""
    if pred.integer and gold.integer and pred.percent == gold.percent:
        return pred.value == gold.value
    if _close(pred.value, gold.value, abs_tol, rel_tol):
        return True
    if pred.percent and not gold.percent:
        return _close(pred.value / 100, gold.value, abs_tol, rel_tol)
    if gold.percent and not pred.percent:
        return _close(pred.value, gold.value / 100, abs_tol, rel_tol)
    return False


def gold_number(cell: object) -> Number | None:
    """The gold number in a cell: an int or float as is; a text's final answer's last
    number ("#### 1,234", "\\boxed{0.5}"), or the text's last number."""
    if isinstance(cell, bool) or cell is None:
        return None
    if isinstance(cell, int | float):
        value = float(cell)
        return Number(value, False, isinstance(cell, int)) if math.isfinite(value) else None
    text = as_text(cell)
    return last_number(final_answer(text) or text)


def numeric_reward(abs_tol: float = DEFAULT_ABS_TOL, rel_tol: float = DEFAULT_REL_TOL) -> RewardFn:
    """A `numeric` reward with these tolerances (the registered one uses the defaults,
    `rel_tol=1e-4`, `abs_tol=1e-9`)."""
    for name, tol in (("abs_tol", abs_tol), ("rel_tol", rel_tol)):
        if not (math.isfinite(tol) and tol >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {tol}")

    def numeric(completions: Sequence[Any], **columns: Any) -> list[float]:
        """1.0 when the completion's final number matches the gold number, else 0.0.

        Columns: `answer`, a number or a text holding one (its final answer's last number:
        "#### 1,234" reads 1234).
        The completion's number is the last number of its final answer (`\\boxed{}`,
        "Answer: ...", the `<answer>` block) or, without one, the last number in the
        completion (as GSM8K is graded). Thousands commas, `\\frac{a}{b}`, `a/b`, `1e3`,
        `\\times 10^{k}`, a leading `$` and trailing units ("12 cm", "5 m/s^2": exponents
        are skipped) are read. Two integers must be equal (12345 is not 12346 however
        large); otherwise `|pred - gold| <= max(abs_tol, rel_tol * |gold|)`. "25%" matches
        25 and 0.25.
        """
        items = completions_list("numeric", completions)
        golds = require_column("numeric", columns, "answer", len(items))

        def score(text: str, cell: object) -> float:
            gold = gold_number(cell)
            if gold is None:
                return 0.0
            answer = final_answer(text)
            pred = last_number(answer) if answer is not None else None
            if pred is None:
                pred = last_number(answer_scope(text)[0])
            return float(pred is not None and numbers_match(pred, gold, abs_tol, rel_tol))

        return score_each("numeric", score, items, golds)

    numeric.__name__ = f"numeric(abs_tol={abs_tol:g}, rel_tol={rel_tol:g})"
    return numeric


register_reward("numeric")(numeric_reward())
