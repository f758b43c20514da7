"""Reading short answers out of free model text: one vocabulary word, or true/false.

Every function here takes any text (empty, huge, unicode, control characters) and never
raises. Only the first `MAX_ANSWER_CHARS` characters are read: an answer is expected near
the start, and scanning a bounded prefix keeps a 20,000-character completion cheap.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection
from dataclasses import dataclass

from vlmgym_envs.core import as_text

MAX_ANSWER_CHARS = 4000

_STRIP = " \t\r\n\"'`*_.,!?;:()[]{}<>"
_WORD = re.compile(r"[a-z]+")
_ANSWER_KEY = re.compile(r"(?:final\s+answer|answer)\s*(?:is|[:=\-])\s*\**\s*([a-z]+)")


def normalize_answer(text: object) -> str:
    """Lower-cased, NFKC-normalised text without control characters or surrounding
    punctuation, quotes and markdown emphasis."""
    s = unicodedata.normalize("NFKC", as_text(text)[:MAX_ANSWER_CHARS])
    s = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in s)
    return s.strip(_STRIP).lower()


@dataclass(frozen=True)
class WordAnswer:
    """A one-word answer read from text.

    word: the vocabulary word read, or None.
    exact: True when the whole text (after `normalize_answer`) is exactly that word.
    reason: why no word was read ("empty", "no vocabulary word", "several vocabulary words:
        a, b"), or "" when one was.
    """

    word: str | None
    exact: bool
    reason: str = ""


def parse_word(text: object, vocabulary: Collection[str]) -> WordAnswer:
    """Read one word of `vocabulary` (lower-case words) from `text`.

    Exact when the normalised text is one vocabulary word ("Red.", " **red** " -> red).
    Otherwise an explicit "answer: X" wins, then the single distinct vocabulary word found
    in the text ("I think it is red" -> red, not exact). Two or more distinct vocabulary
    words and no explicit answer read as nothing.
    """
    s = normalize_answer(text)
    if not s:
        return WordAnswer(None, False, "empty")
    if s in vocabulary:
        return WordAnswer(s, True)
    explicit = [w for w in _ANSWER_KEY.findall(s) if w in vocabulary]
    if explicit:
        return WordAnswer(explicit[-1], False)
    found = sorted({w for w in _WORD.findall(s) if w in vocabulary})
    if len(found) == 1:
        return WordAnswer(found[0], False)
    if not found:
        return WordAnswer(None, False, "no vocabulary word")
    return WordAnswer(None, False, "several vocabulary words: " + ", ".join(found))


_NEGATED = re.compile(r"\bnot\s+(true|false)\b")
TRUE_WORDS = frozenset({"true", "yes"})
FALSE_WORDS = frozenset({"false", "no"})


@dataclass(frozen=True)
class BoolAnswer:
    """A true/false answer read from text: `value` is None when ambiguous or absent."""

    value: bool | None
    ambiguous: bool
    reason: str = ""


def parse_bool(text: object) -> BoolAnswer:
    """Read True/False from text; "true"/"yes" and "false"/"no" in any case.

    In order: the whole answer is one of the words; an explicit "answer: X" (the last one);
    the first word of the text; the only polarity among all the words ("not true" reads as
    false and "not false" as true). Text that otherwise mentions both polarities is
    ambiguous (`ambiguous=True`); text that mentions neither has no answer. Both read as
    value None.
    """
    s = _NEGATED.sub(lambda m: "false" if m.group(1) == "true" else "true", normalize_answer(text))
    if not s:
        return BoolAnswer(None, False, "empty")
    vocabulary = TRUE_WORDS | FALSE_WORDS
    if s in vocabulary:
        return BoolAnswer(s in TRUE_WORDS, False)
    explicit = [w for w in _ANSWER_KEY.findall(s) if w in vocabulary]
    if explicit:
        return BoolAnswer(explicit[-1] in TRUE_WORDS, False)
    words = _WORD.findall(s)
    if words and words[0] in vocabulary:
        return BoolAnswer(words[0] in TRUE_WORDS, False)
    has_true = any(w in TRUE_WORDS for w in words)
    has_false = any(w in FALSE_WORDS for w in words)
    if has_true != has_false:
        return BoolAnswer(has_true, False)
    if has_true:
        return BoolAnswer(None, True, "both true and false")
    return BoolAnswer(None, False, "no true/false/yes/no")
