"""The `choice` reward: multiple choice, the answered option letter against the gold one."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Any

from vlmgym_envs.core import as_text
from vlmgym_envs.rewards.extract import answer_scope, final_answer, normalize_text
from vlmgym_envs.rewards.inputs import (
    completions_list,
    optional_column,
    require_column,
    score_each,
)
from vlmgym_envs.rewards.registry import register_reward

LETTERS = string.ascii_uppercase
_MAX_OPTION_TEXT = 2000  # longer candidate texts are not compared with the options

# "B", "(b)", "B.", "b)", "[B]", "B:": the whole answer is a letter.
_LONE = re.compile(r"[(\[]?([A-Za-z])[)\]]?[.:]?")
# "(B) 42", "B. 42", "B) 42", "B: 42", "option B", "choice (c)": a letter leading the answer.
_LEADING = re.compile(r"\(([A-Za-z])\)|([A-Z])[.):\]](?=\s|$)|(?i:option|choice)\s+\(?([A-Za-z])\b")
# "the correct option is (B)", "I choose C", "option b." in free text (last one counts);
# a lower-case letter only in parentheses or before punctuation, never "a" as an article.
_PHRASE = re.compile(
    r"\b(?i:option|choice|choose|pick|select)(?:\s+is)?\s*(?::\s*)?"
    r"(?:\(([A-Za-z])\)|([A-Z])\b|([a-z])(?=[.,;:!?)]|\s*$))"
)
_PARENTHESISED = re.compile(r"\(([A-Z])\)")
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")


def _letter_groups(match: re.Match[str] | None) -> str | None:
    if match is None:
        return None
    return next(g for g in match.groups() if g).upper()


def option_letter(answer: object, choices: Sequence[Any] | None = None) -> str | None:
    """The option letter an extracted answer names: a lone letter ("B", "(b)", "B."), a
    leading one ("(B) 42", "C. blue", "option D"), or, given `choices`, the text of exactly
    one option (equal after `normalize_text`, or contained in the answer as whole words).
    """
    s = _TEXT_COMMAND.sub(r"\1", as_text(answer)).strip().strip("$*_` ")
    lone = _LONE.fullmatch(s)
    if lone:
        return lone.group(1).upper()
    leading = _letter_groups(_LEADING.match(s))
    if leading:
        return leading
    if choices:
        index = choice_index(s, choices)
        if index is not None:
            return LETTERS[index]
    return None


def choice_index(text: str, choices: Sequence[Any]) -> int | None:
    """Index of the one option whose text `text` is (or contains as whole words), or None."""
    if len(text) > _MAX_OPTION_TEXT:
        return None
    options = [normalize_text(c) for c in choices[: len(LETTERS)]]
    s = normalize_text(text)
    if not s:
        return None
    equal = [i for i, o in enumerate(options) if o and o == s]
    if len(equal) == 1:
        return equal[0]
    within = [
        i
        for i, o in enumerate(options)
        if o and re.search(r"(?<!\w)" + re.escape(o) + r"(?!\w)", s)
    ]
    return within[0] if len(within) == 1 else None


def answered_letter(text: str, choices: Sequence[Any] | None = None) -> str | None:
    """The option letter a completion answers, or None. In order: the letter of its final
    answer (`final_answer`: boxed, "Answer: ...", `<answer>` block); the last phrase naming
    an option ("the correct option is (B)", "I choose C"); the one letter the text leads
    with ("B", "B. Because...") or writes in parentheses ("I think (C) fits"), when it names
    no other in parentheses; the one option whose text it holds.
    """
    answer = final_answer(text)
    if answer is not None:
        letter = option_letter(answer, choices)
        if letter:
            return letter
    scope, _ = answer_scope(text)
    phrase = None
    for match in _PHRASE.finditer(scope):
        phrase = match
    if phrase is not None:
        return _letter_groups(phrase)
    named = set(_PARENTHESISED.findall(scope))
    leading = option_letter(scope[:_MAX_OPTION_TEXT].strip(), None)
    if leading:
        named.add(leading)
    if len(named) == 1:
        return named.pop()
    if choices and not named:
        index = choice_index(scope, choices)
        if index is not None:
            return LETTERS[index]
    return None


def gold_letter(gold: object, choices: Sequence[Any] | None = None) -> str | None:
    """The gold option letter: an int is a 0-based index into the options; a string is a
    letter ("B", "(b)", in range when `choices` is given) or, given `choices`, the text of
    one option. None when it names no option (the row then scores 0)."""
    if isinstance(gold, int) and not isinstance(gold, bool):
        in_range = 0 <= gold < len(LETTERS) and (not choices or gold < len(choices))
        return LETTERS[gold] if in_range else None
    text = as_text(gold).strip()
    lone = _LONE.fullmatch(text.strip("$*_` "))
    if lone and (not choices or LETTERS.index(lone.group(1).upper()) < len(choices)):
        return lone.group(1).upper()
    if choices:
        index = choice_index(text, choices)
        return None if index is None else LETTERS[index]
    return None


@register_reward("choice")
def choice_reward(completions: Sequence[Any], **columns: Any) -> list[float]:
    """1.0 when the completion answers the gold option of a multiple-choice question.

    Columns: `answer` (a letter "B", a 0-based index 1, or, with `choices`, the option's
    text) and optionally `choices` (the options' texts in order, A first).
    The answered letter is `answered_letter`: "(B)", "B.", "Answer: B", "the answer is b",
    `\\boxed{B}`, "the correct option is (B)", or the text of one option when `choices` is
    given. A completion naming no letter, or naming none clearly (several parenthesised
    letters and no answer), scores 0.
    """
    items = completions_list("choice", completions)
    golds = require_column("choice", columns, "answer", len(items))
    options = optional_column("choice", columns, "choices", len(items))

    def score(text: str, gold: object, choices: object) -> float:
        listed = None  # a list, tuple or array of option texts; anything else: no options
        if choices is not None and not isinstance(choices, str | bytes | dict):
            listed = list(choices) if hasattr(choices, "__len__") else None
        expected = gold_letter(gold, listed)
        return float(expected is not None and answered_letter(text, listed) == expected)

    return score_each("choice", score, items, golds, options)
