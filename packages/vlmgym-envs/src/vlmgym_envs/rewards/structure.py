"""Format rewards: `format` (R1's `<think>...</think><answer>...</answer>`) and
`boxed_format` (exactly one `\\boxed{}`). They read the shape of a completion, never
whether its answer is right; weigh them low next to a correctness reward."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlmgym_envs.rewards.extract import find_boxed
from vlmgym_envs.rewards.inputs import completions_list, score_each
from vlmgym_envs.rewards.registry import register_reward

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_MAX_STOP_MARKER = 64


def strip_stop_markers(text: str) -> str:
    """`text` without trailing whitespace and `<|...|>` stop markers (`<|im_end|>`,
    `<|endoftext|>`), which a decoder may leave at the end."""
    end = _rstrip_end(text, len(text))
    while text.endswith("|>", 0, end):
        start = text.rfind("<|", max(0, end - _MAX_STOP_MARKER), end)
        if start == -1:
            break
        end = _rstrip_end(text, start)
    return text[:end]


def _rstrip_end(text: str, end: int) -> int:
    """Where `text[:end].rstrip()` ends, without copying the text."""
    while end > 0 and text[end - 1].isspace():
        end -= 1
    return end


def r1_format_ok(text: str) -> bool:
    """Whether `text` is `<think>...</think>` then `<answer>...</answer>` and nothing else:
    each tag exactly once, in that order, only whitespace before, between and after
    (trailing stop markers allowed), and a non-blank answer."""
    text = strip_stop_markers(text)
    if any(text.count(tag) != 1 for tag in _TAGS):
        return False
    think, think_end, answer, answer_end = (text.find(tag) for tag in _TAGS)
    if not think < think_end < answer < answer_end:
        return False
    return (
        not text[:think].strip()
        and not text[think_end + len("</think>") : answer].strip()
        and not text[answer_end + len("</answer>") :].strip()
        and bool(text[answer + len("<answer>") : answer_end].strip())
    )


@register_reward("format")
def format_reward(completions: Sequence[Any], **columns: Any) -> list[float]:
    """1.0 when the completion is exactly `<think>...</think>` followed by
    `<answer>...</answer>`, else 0.0 (`r1_format_ok`).

    Whitespace may surround and separate the blocks; nothing else may (no text before
    `<think>` or after `</answer>`), each tag appears once, and the answer is not blank.
    The think block may be empty. The completion must hold the opening `<think>` itself:
    with a chat template that writes it into the prompt, prepend it before scoring.
    Needs no column.
    """
    items = completions_list("format", completions)
    return score_each("format", lambda text: float(r1_format_ok(text)), items)


def one_boxed(text: str) -> bool:
    """Whether `text` has exactly one `\\boxed`, with balanced braces and non-blank
    content."""
    if text.count("\\boxed") != 1:
        return False
    spans = find_boxed(text)
    return len(spans) == 1 and bool(text[spans[0][0] : spans[0][1]].strip())


@register_reward("boxed_format")
def boxed_format_reward(completions: Sequence[Any], **columns: Any) -> list[float]:
    """1.0 when the completion holds exactly one well-formed `\\boxed{...}` (balanced
    braces, non-blank content, no other `\\boxed`), else 0.0. Needs no column."""
    items = completions_list("boxed_format", completions)
    return score_each("boxed_format", lambda text: float(one_boxed(text)), items)
