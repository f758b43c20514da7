"""Finding the final answer in a completion: `\\boxed{}`, "Answer: ...", `<answer>` blocks.

Every function here takes any text (empty, 100,000 characters, unbalanced braces, control
characters, non-strings) and never raises. Each scans the text a bounded number of times
with patterns that cannot backtrack, so the cost is linear in the length of the text.

Where the answer is (`final_answer`):

1. Scope: the last non-empty `<answer>...</answer>` block when no `\\boxed` follows it,
   otherwise the whole text. An `<answer>` block is where an R1-style completion puts its
   answer, so "the answer is 3... wait" in the reasoning before it does not count; a
   `\\boxed` after the block (the block was an echo of the instructions) does.
2. In the scope, the last non-empty `\\boxed{...}` with balanced braces (escaped `\\{`
   and `\\}` do not count as braces); an empty `\\boxed{}` (an echoed instruction) is
   skipped.
3. Else the last final-answer line: "Answer: X", "answer is X", "final answer = X",
   "#### X" (GSM8K), case-insensitive, markdown emphasis allowed ("**Answer:** X"); X is
   the rest of that line (the next line when it is empty), cut at its first `$...$` or
   at the end of its first sentence.
4. Else the content of the `<answer>` block when there is one, else nothing (None).
"""

from __future__ import annotations

import re
import unicodedata

from vlmgym_envs.core import as_text

_BOXED_OPEN = re.compile(r"\\boxed\s*\{")
# An escaped brace or backslash pair is one token, so `\{` and `\\}` are read correctly.
_BRACE_TOKEN = re.compile(r"\\[\\{}]|[{}]")
_ANSWER_LINE = re.compile(
    r"(?:\b(?:final[ \t]+answer|answer)\b[ \t]*(?:[*_]+[ \t]*)?(?:is\b[ \t]*:?|:|=)|####)"
    r"[ \t*_]*(?P<ans>[^\n]*)",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{")
_SPACE = re.compile(r"\s+")
_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_STRIP = " \t\r\n\"'`*_.,!?;:()[]{}<>"
_OPEN_TAG, _CLOSE_TAG = "<answer>", "</answer>"


def find_boxed(text: object) -> list[tuple[int, int]]:
    """The `(start, end)` content spans of every well-formed `\\boxed{...}` in `text`,
    ordered by where they open (a nested box comes after the box around it).

    One pass over the braces with a stack; a box whose brace never closes is left out.
    """
    text = as_text(text)
    if "\\boxed" not in text:
        return []
    opens = {m.end() - 1 for m in _BOXED_OPEN.finditer(text)}
    spans: list[tuple[int, int]] = []
    stack: list[tuple[int, int]] = []  # (brace depth of the box, content start)
    depth = 0
    for m in _BRACE_TOKEN.finditer(text):
        token = m.group()
        if token == "{":
            depth += 1
            if m.start() in opens:
                stack.append((depth, m.end()))
        elif token == "}":
            if stack and stack[-1][0] == depth:
                spans.append((stack.pop()[1], m.start()))
            depth = max(depth - 1, 0)
    spans.sort()
    return spans


def extract_boxed(text: object) -> str | None:
    """The content of the last non-empty `\\boxed{...}` (stripped), or None."""
    text = as_text(text)
    for start, end in reversed(find_boxed(text)):
        content = text[start:end].strip()
        if content:
            return content
    return None


def _answer_block_span(text: str) -> tuple[int, int] | None:
    """Content span of the last `<answer>...</answer>` block with non-blank content."""
    end = text.rfind(_CLOSE_TAG)
    while end != -1:
        start = text.rfind(_OPEN_TAG, 0, end)
        if start == -1:
            return None
        if text[start + len(_OPEN_TAG) : end].strip():
            return start + len(_OPEN_TAG), end
        end = text.rfind(_CLOSE_TAG, 0, start)
    return None


def answer_block(text: object) -> str | None:
    """The stripped content of the last non-empty `<answer>...</answer>` block, or None."""
    text = as_text(text)
    span = _answer_block_span(text)
    return None if span is None else text[span[0] : span[1]].strip()


def answer_scope(text: object) -> tuple[str, bool]:
    """Where to look for the answer: `(the answer block's content, True)` when the text
    has a non-empty `<answer>` block and no `\\boxed` after it, else `(text, False)`."""
    text = as_text(text)
    span = _answer_block_span(text)
    if span is None or "\\boxed" in text[span[1] :]:
        return text, False
    return text[span[0] : span[1]], True


def answer_line(text: object) -> str | None:
    """The answer on the last final-answer line ("Answer: X", "#### X"...), or None."""
    text = as_text(text)
    last = None
    for match in _ANSWER_LINE.finditer(text):
        last = match
    if last is None:
        return None
    content = last.group("ans").strip()
    if not content:  # "Answer:\n42": the answer is on the next line
        start = last.end() + 1
        end = text.find("\n", start)
        content = text[start : end if end != -1 else len(text)].strip()
    content = content.strip("*_ \t")
    for left, right in _DELIMITERS[:2]:
        if content.startswith(left):
            close = content.find(right, len(left))
            if close != -1:
                return clean_answer(content[len(left) : close]) or None
    cut = _SENTENCE_END.search(content)
    return clean_answer(content[: cut.start()] if cut else content) or None


def final_answer(text: object) -> str | None:
    """The model's final answer (rules in the module docstring), or None."""
    scope, in_block = answer_scope(text)
    boxed = extract_boxed(scope)
    if boxed is not None:
        return clean_answer(boxed) or None
    line = answer_line(scope)
    if line is not None:
        return line
    return (clean_answer(scope) or None) if in_block else None


def clean_answer(text: object) -> str:
    """An extracted answer without surrounding whitespace, math delimiters (`$...$`,
    `\\(...\\)`, `\\[...\\]`), markdown emphasis or a final period; U+2212 minus as `-`."""
    s = as_text(text).strip().replace("\u2212", "-")
    for left, right in _DELIMITERS:
        if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            s = s[len(left) : len(s) - len(right)].strip()
            break
    s = s.strip("*_` \t\r\n")
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    return s


def unwrap_text_commands(text: str) -> str:
    """`\\text{abc}` (and `\\textbf`, `\\mathrm`, `\\mbox`...) replaced by `abc`.

    The command and its braces are dropped in one pass over the text (balanced braces,
    escaped braces kept); an unclosed command keeps its content.
    """
    if "\\" not in text:
        return text
    opens = {m.end() - 1: m.start() for m in _TEXT_COMMAND.finditer(text)}
    if not opens:
        return text
    drop: list[tuple[int, int]] = []  # spans to remove: commands and their braces
    stack: list[bool] = []  # per open brace: is it a text command's brace?
    for m in _BRACE_TOKEN.finditer(text):
        if m.group() == "{":
            is_command = m.start() in opens
            stack.append(is_command)
            if is_command:
                drop.append((opens[m.start()], m.end()))
        elif m.group() == "}" and stack and stack.pop():
            drop.append((m.start(), m.end()))
    drop.sort()
    pieces, pos = [], 0
    for start, end in drop:
        pieces.append(text[pos:start])
        pos = max(pos, end)
    pieces.append(text[pos:])
    return "".join(pieces)


def normalize_text(text: object) -> str:
    """Text for string comparison: NFKC, control characters as spaces, `\\text{}`-like
    commands unwrapped, `$` and `\\(`, `\\)` dropped, case-folded, runs of whitespace as one
    space, surrounding punctuation, quotes, brackets and markdown stripped."""
    s = unicodedata.normalize("NFKC", as_text(text))
    s = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in s)
    s = unwrap_text_commands(s)
    s = s.replace("$", " ").replace("\\(", " ").replace("\\)", " ").replace("\u2212", "-")
    return _SPACE.sub(" ", s.casefold()).strip(_STRIP).strip()
