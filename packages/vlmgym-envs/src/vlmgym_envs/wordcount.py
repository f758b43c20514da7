"""`wordcount`: answer a short question in exactly N words (text only, no download).

A task a real small instruction model (Qwen2.5 0.5B) can learn in minutes: it already
answers sensibly, but rarely in the requested number of words, and the reward says how far
off it was. Built for real-weights learning runs (`benchmarks/real_learning.py`).

Tasks: `len(env) = len(QUESTIONS) * (max_words - min_words + 1)`; task `idx` pairs question
`QUESTIONS[idx // K]` with target `N = min_words + idx % K` (K targets), so every question
appears with every target and `reset(idx)` is a pure function of (config, idx). The prompt
is one user message (after an optional system message):

    "<question> Answer in exactly <N> word(s)."

What counts as a word: the answer is first cut before any trailing chat stop markers
(`<|im_end|>`, `<|endoftext|>` or any `<|...|>`) and whitespace; then a word is a maximal
run of non-whitespace characters containing at least one letter or digit (Unicode-aware).
So "don't", "well-known", "3.5", "U.S." and "Paris." are one word each, "-" and "..." are
none, and "Hello,world" is one.

Reward, with w words counted and target N:

    reward = 1 / (1 + |w - N|)     if w >= 1
    reward = 0                     if w == 0 (empty or punctuation-only answer)

1 for exactly N words, 0.5 one off, 1/3 two off...; never negative, always below 1 when
wrong, so within a GRPO group the answer closer to N always earns more. `info` holds
`words` (w), `target` (N), `error` (w - N), `exact` (w == N), `question` (the question's
index in `QUESTIONS`) and `counted` (the first `MAX_LISTED_WORDS` words read).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from vlmgym_envs.core import Env, Observation, StepResult, as_text, system_message, user_message

QUESTIONS: tuple[str, ...] = (
    "What is the capital of France?",
    "Describe the ocean.",
    "Why is the sky blue?",
    "What do cats like to eat?",
    "Name something you can find in a kitchen.",
    "What is your favourite season, and why?",
    "Describe a rainy day.",
    "What is a computer?",
    "How do plants grow?",
    "What makes a good friend?",
    "Describe the taste of a lemon.",
    "What is the moon made of?",
    "How does a bicycle work?",
    "What is music?",
    "Describe a busy city street.",
    "Why do people sleep?",
    "What is the largest animal on Earth?",
    "Give a tip for learning a new language.",
    "What happens when water freezes?",
    "Describe your ideal breakfast.",
    "What is a programming language?",
    "How do birds fly?",
    "What is the purpose of a library?",
    "Describe a forest at night.",
    "Why is exercise healthy?",
    "What is the weather like in a desert?",
    "Explain what a map is for.",
    "What does a firefighter do?",
    "Describe the colour green.",
    "How do you make a cup of tea?",
    "What is gravity?",
    "Name a famous painting.",
    "Why do leaves change colour in autumn?",
    "What is a good name for a dog?",
    "Describe the sound of thunder.",
    "What is the best way to relax?",
    "How many legs does a spider have?",
    "What is a volcano?",
    "Describe a mountain.",
    "Summarise what a calendar does.",
)
"""The fixed questions, in task order (40, varied, none of which asks for a length)."""

MAX_LISTED_WORDS = 32
"""`info["counted"]` lists at most this many words (the count itself is never capped)."""

_TRAILING_STOPS = re.compile(r"(?:\s*<\|[^<>|\s]{1,40}\|>)+\s*\Z")
_HAS_ALNUM = re.compile(r"[^\W_]")  # a Unicode letter or digit


def strip_stops(text: str) -> str:
    """`text` without trailing chat stop markers (`<|im_end|>`...) and surrounding space."""
    return _TRAILING_STOPS.sub("", text).strip()


def count_words(text: str) -> list[str]:
    """The words of an answer, as the reward counts them (see the module docstring).

    Whitespace-separated pieces that hold at least one letter or digit, after stripping
    trailing stop markers: `count_words("Hi - it's 3.5 km! <|im_end|>")` is
    `["Hi", "it's", "3.5", "km!"]`.
    """
    return [piece for piece in strip_stops(text).split() if _HAS_ALNUM.search(piece)]


def word_count_reward(words: int, target: int) -> float:
    """`1 / (1 + |words - target|)`, or 0 when there are no words."""
    if words <= 0:
        return 0.0
    return 1.0 / (1.0 + abs(words - target))


@dataclass(frozen=True)
class WordCountState:
    """One task: the question's index in `QUESTIONS` and the target word count."""

    idx: int
    question: int
    target: int


class WordCountEnv(Env[WordCountState]):
    """Answer a question in exactly N words (see the module docstring).

    min_words, max_words: the range of targets N (1 <= min_words <= max_words).
    system_prompt: an optional system message put before the question.
    """

    def __init__(
        self, *, min_words: int = 1, max_words: int = 8, system_prompt: str | None = None
    ) -> None:
        if not 1 <= min_words <= max_words:
            raise ValueError(
                f"need 1 <= min_words <= max_words, got min_words={min_words}, "
                f"max_words={max_words}"
            )
        self.min_words = min_words
        self.max_words = max_words
        self.system_prompt = system_prompt

    @property
    def num_targets(self) -> int:
        return self.max_words - self.min_words + 1

    def __len__(self) -> int:
        return len(QUESTIONS) * self.num_targets

    def task(self, idx: int) -> WordCountState:
        """The state of task `idx` (a pure function of the config and `idx`)."""
        idx = self.check_index(idx)
        question, offset = divmod(idx, self.num_targets)
        return WordCountState(idx=idx, question=question, target=self.min_words + offset)

    @staticmethod
    def prompt(state: WordCountState) -> str:
        """The user text of a task."""
        unit = "word" if state.target == 1 else "words"
        return f"{QUESTIONS[state.question]} Answer in exactly {state.target} {unit}."

    def reset(self, idx: int) -> tuple[WordCountState, Observation]:
        state = self.task(idx)
        messages = [user_message(self.prompt(state))]
        if self.system_prompt:
            messages.insert(0, system_message(self.system_prompt))
        return state, Observation(messages)

    def step(self, state: WordCountState, text: str) -> StepResult[WordCountState]:
        words = count_words(as_text(text))
        n = len(words)
        info: dict[str, Any] = {
            "words": n,
            "target": state.target,
            "error": n - state.target,
            "exact": n == state.target,
            "question": state.question,
            "counted": words[:MAX_LISTED_WORDS],
        }
        if n == 0:
            info["parse_error"] = "no words (empty or punctuation-only answer)"
        return StepResult(reward=word_count_reward(n, state.target), done=True, info=info)
