"""Standard tasks: `DatasetEnv` configured for published datasets, each read in its hub
layout from the hub cache by default, or from `path=` (a local copy in any form
`DatasetEnv` reads). Every other `DatasetEnv` keyword passes through.

- `geometry3k` (`hiyouga/geometry3k`, splits train / validation / test): columns `images`
  (a list of `Image`), `problem` (text with an `<image>` marker where the diagram goes),
  `answer` (LaTeX or a number). R1-style prompt: reason in <think> </think>, answer in
  \\boxed{}. Reward "math" (math-verify against `answer`).
- `clevr_count` (`leonardPKU/clevr_cogen_a_train`, the CLEVR-CoGenT-A counting set R1-V
  trains on; split train): columns `image` (`Image`), `problem` ("How many items are there
  in the image?"), `solution` ("<answer> 3 </answer>"). The gold `answer` is derived from
  `solution` (the text inside <answer>, else all of it); R1-V's prompt; reward "numeric".
- `mathvista` (`AI4Math/MathVista`, split testmini; for evaluation): columns
  `decoded_image` (`Image`), `query` (the benchmark's own prompt with its hint and
  lettered choices), `question_type` ("multi_choice" / "free_form"), `answer_type`
  ("text", "integer", "float", "list"), `choices` (a list, None for free-form), `answer`
  (for multiple choice the text of the right choice), `precision`. The reward
  (`MathVistaReward`) scores each row by its type: "choice" against the right choice's
  letter (derived column `answer_letter`) for multi_choice, "numeric" for integer and float
  answers (within the row's `precision`: half a unit of its last decimal place, as the
  benchmark rounds predictions), "exact" for the rest. `multi_choice_only=True` keeps only
  multiple-choice rows. `metrics` adds the accuracy per question type.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from statistics import fmean
from typing import Any

from vlmgym_envs.data.errors import SkipTask
from vlmgym_envs.dataset_env import DatasetEnv
from vlmgym_envs.dataset_reward import (
    RewardFn,
    RewardPart,
    accepted_columns,
    call_reward,
    named_reward,
)

GEOMETRY3K_HUB = "hiyouga/geometry3k"
CLEVR_COUNT_HUB = "leonardPKU/clevr_cogen_a_train"
MATHVISTA_HUB = "AI4Math/MathVista"

GEOMETRY3K_PROMPT = (
    "{problem}\nThink through the problem step by step inside <think> </think> tags, then "
    "give the final answer in \\boxed{{}}."
)
CLEVR_COUNT_PROMPT = (
    "{problem} Output the thinking process in <think> </think> and final answer (number) in "
    "<answer> </answer> tags."
)  # R1-V's question template
MATHVISTA_PROMPT = "{query}"

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


class Geometry3KEnv(DatasetEnv):
    """Geometry3K diagrams and problems, math reward (see the module docstring)."""

    def __init__(
        self,
        path: str | os.PathLike[str] | Any = None,
        split: str = "train",
        *,
        prompt: str = GEOMETRY3K_PROMPT,
        reward: Any = "math",
        **kwargs: Any,
    ) -> None:
        path = path if path is not None else GEOMETRY3K_HUB
        super().__init__(path, split, image_column="images", prompt=prompt, reward=reward, **kwargs)


def clevr_answer(row: Mapping[str, Any]) -> str:
    """The count inside `solution`'s <answer> tags (all of it without tags); a row without
    one is skipped ("no_answer")."""
    solution = row["solution"]
    text = solution if isinstance(solution, str) else ""
    match = _ANSWER_TAG.search(text)
    answer = (match.group(1) if match else text).strip()
    if not answer:
        raise SkipTask("no_answer", f"solution {str(solution)[:80]!r} holds no answer")
    return answer


class ClevrCountEnv(DatasetEnv):
    """CLEVR counting as R1-V trains it, numeric reward (see the module docstring)."""

    def __init__(
        self,
        path: str | os.PathLike[str] | Any = None,
        split: str = "train",
        *,
        prompt: str = CLEVR_COUNT_PROMPT,
        reward: Any = "numeric",
        **kwargs: Any,
    ) -> None:
        kwargs["derived"] = {"answer": clevr_answer, **dict(kwargs.get("derived") or {})}
        path = path if path is not None else CLEVR_COUNT_HUB
        super().__init__(path, split, image_column="image", prompt=prompt, reward=reward, **kwargs)


def answer_letter(row: Mapping[str, Any]) -> str | None:
    """The letter of the right choice of a multi_choice row ("A" for the first), None for
    free-form rows; a multiple-choice answer that is not one of the choices is skipped
    ("answer_not_in_choices")."""
    if row["question_type"] != "multi_choice":
        return None
    choices = list(row["choices"] or [])
    answer = row["answer"]
    if answer not in choices:
        raise SkipTask("answer_not_in_choices", f"answer {answer!r} is not in {choices}")
    return chr(ord("A") + choices.index(answer))


def mathvista_kind(question_type: Any, answer_type: Any) -> str:
    """The reward a MathVista row is scored with: "choice", "numeric" or "exact"."""
    if question_type == "multi_choice":
        return "choice"
    return "numeric" if answer_type in ("integer", "float") else "exact"


def mathvista_numeric(completions: list[str], answer: list[Any], precision: list[Any]) -> list:
    """The `numeric` reward within each row's `precision`: a float answer given to p
    decimals matches a prediction within half a unit of its last place (MathVista's own
    scorer rounds the prediction to p decimals); rows without one use `numeric` as is."""
    from vlmgym_envs.rewards import numeric_reward

    out: list[float] = [0.0] * len(completions)
    groups: dict[int | None, list[int]] = {}
    for i, p in enumerate(precision):
        places = int(p) if isinstance(p, int | float) and 0 <= p <= 12 else None
        groups.setdefault(places, []).append(i)
    for places, idx in groups.items():
        reward = numeric_reward() if places is None else numeric_reward(abs_tol=0.5 * 10**-places)
        scores = reward([completions[i] for i in idx], answer=[answer[i] for i in idx])
        for i, score in zip(idx, scores, strict=True):
            out[i] = score
    return out


class MathVistaReward:
    """Scores each MathVista row with the reward of its type (`mathvista_kind`), one batched
    call per type: "choice" gets `answer` = the right letter and `choices`; "numeric"
    (default `mathvista_numeric`) gets `answer` and `precision`; "exact" gets `answer`
    (each only the columns it takes). A reward is a name (resolved now) or a callable."""

    __name__ = "mathvista"

    def __init__(
        self,
        choice: str | RewardFn = "choice",
        numeric: str | RewardFn = mathvista_numeric,
        exact: str | RewardFn = "exact",
    ) -> None:
        self.parts: dict[str, RewardPart] = {}
        for kind, spec in (("choice", choice), ("numeric", numeric), ("exact", exact)):
            fn = named_reward(spec) if isinstance(spec, str) else spec
            self.parts[kind] = RewardPart(kind, 1.0, fn, accepted_columns(fn))

    def __call__(self, completions: list[str], **columns: list[Any]) -> list[float]:
        n = len(completions)
        types = zip(columns["question_type"], columns["answer_type"], strict=True)
        kinds = [mathvista_kind(q, a) for q, a in types]
        out = [0.0] * n
        for kind, part in self.parts.items():
            idx = [i for i in range(n) if kinds[i] == kind]
            if not idx:
                continue
            given = _kind_columns(kind, columns, idx)
            if part.columns is not None:
                given = {c: v for c, v in given.items() if c in part.columns}
            values, errors = call_reward(part, [completions[i] for i in idx], given)
            failed = [e for e in errors if e]
            if failed:
                raise ValueError(failed[0])  # DatasetEnv retries alone and reports it
            for i, v in zip(idx, values, strict=True):
                out[i] = v or 0.0
        return out


_KIND_COLUMNS: dict[str, dict[str, str]] = {
    "choice": {"answer": "answer_letter", "choices": "choices"},
    "numeric": {"answer": "answer", "precision": "precision"},
    "exact": {"answer": "answer"},
}  # reward keyword -> MathVista column, per kind


def _kind_columns(kind: str, columns: Mapping[str, list[Any]], idx: list[int]) -> dict:
    return {k: [columns[c][i] for i in idx] for k, c in _KIND_COLUMNS[kind].items()}


class MathVistaEnv(DatasetEnv):
    """MathVista for evaluation (see the module docstring)."""

    def __init__(
        self,
        path: str | os.PathLike[str] | Any = None,
        split: str = "testmini",
        *,
        prompt: str = MATHVISTA_PROMPT,
        reward: Any = None,
        multi_choice_only: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs["derived"] = {"answer_letter": answer_letter, **dict(kwargs.get("derived") or {})}
        kwargs["info_columns"] = [
            *kwargs.get("info_columns", ()),
            "question_type",
            "answer_type",
            "answer_letter",
        ]
        if multi_choice_only:
            user_keep = kwargs.get("keep")
            kwargs["keep"] = lambda row: (
                row["question_type"] == "multi_choice" and (user_keep is None or user_keep(row))
            )
        path = path if path is not None else MATHVISTA_HUB
        reward = reward if reward is not None else MathVistaReward()
        super().__init__(
            path, split, image_column="decoded_image", prompt=prompt, reward=reward, **kwargs
        )

    def metrics(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """DatasetEnv's metrics, and `accuracy/<question_type>` per question type."""
        out = super().metrics(records)
        by_type: dict[str, list[bool]] = {}
        for r in records:
            info = r.get("info") or {}
            by_type.setdefault(str(info.get("question_type")), []).append(bool(info.get("correct")))
        for kind, correct in sorted(by_type.items()):
            out[f"accuracy/{kind}"] = fmean(correct)
        return out
