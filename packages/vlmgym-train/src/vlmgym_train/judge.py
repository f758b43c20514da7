"""A model judge: a reward that asks a second vlm-gym model to score completions.

    judge = ModelJudge("models/qwen7b", rubric="Is the caption faithful and specific?")
    env = DatasetEnv(..., reward=[judge, "boxed_format"])                 # Python
    --env_kwargs '{"reward": {"judge": {"model_dir": "models/qwen7b", "rubric": "...",
                                        "weight": 1.0}, "format": 0.1}}'  # command line

It is a TRL-style batched reward function, `judge(completions, **columns) -> list[float]`:
for each completion it renders a judging prompt (`JUDGE_TEMPLATE`: the rubric, the task's
question and reference answer when the row has them, the completion), generates a short
verdict greedily with the same `Sampler` the policy uses (one batched call per reward
call, the judge's own params, optionally on a device of its own), and reads the score out
of the verdict (`parse_score`). The reward is score / scale, in [0, 1]; a verdict without a
readable score gives 0 and is counted in `unparsed`.

Cost: one prefill of the judging prompt (rubric + question + completion, typically a few
hundred tokens) and up to `max_new_tokens` (default 16) decode steps per completion, on
the judge's weights: for a judge of the policy's size that is about one more rollout's
prefill per step and a fraction of its decoding; a 7B judge on a 3B policy costs about
2.5x that. Its weights take their own memory (bf16 by default: 2 bytes per parameter).
The judge's rows are batched, so a group of G completions costs one `generate` call.
Measured on this project's CPU (tiny models in the tests; the 0.5B real model in the
closing note of the issue that added it).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

JUDGE_TEMPLATE = (
    "You are grading an answer.\n\nRubric: {rubric}\n\n{context}"
    "Answer to grade:\n{completion}\n\n"
    "Reply with one line: 'Score: N' where N is an integer from 0 to {scale}."
)
QUESTION_COLUMNS = ("question", "problem", "prompt", "query")
REFERENCE_COLUMNS = ("answer", "reference", "solution", "caption")
MAX_COMPLETION_CHARS = 8000

_NUMBER = r"(-?\d+(?:\.\d+)?)"
_SCORE_PATTERNS = (
    re.compile(rf"score\s*[:=]?\s*\**\s*{_NUMBER}\s*(?:/\s*{_NUMBER})?", re.IGNORECASE),
    re.compile(rf"\[\[\s*{_NUMBER}\s*\]\]"),
    re.compile(rf"{_NUMBER}\s*(?:/|out of)\s*{_NUMBER}", re.IGNORECASE),
    re.compile(rf"^\s*{_NUMBER}\s*$", re.MULTILINE),
)


def parse_score(verdict: str, scale: float) -> float | None:
    """The score in a judge's verdict, as a fraction of `scale` in [0, 1]; None when none
    is readable. Reads, in order: "Score: 7" / "score = 7/10", "[[7]]", "7/10" or
    "7 out of 10", a line holding only a number. A fraction's own denominator wins over
    `scale`; values are clipped to [0, 1]."""
    text = verdict[:4000]
    for pattern in _SCORE_PATTERNS:
        found = pattern.search(text)
        if found is None:
            continue
        groups = [g for g in found.groups() if g is not None]
        value = float(groups[0])
        denominator = float(groups[1]) if len(groups) > 1 else scale
        if denominator <= 0:
            continue
        return min(max(value / denominator, 0.0), 1.0)
    return None


def _first(columns: Mapping[str, Sequence[Any]], names: Sequence[str], i: int) -> str | None:
    for name in names:
        values = columns.get(name)
        if values is not None and i < len(values) and isinstance(values[i], str | int | float):
            return str(values[i])
    return None


class ModelJudge:
    """A reward scored by a judge model (see the module docstring).

    model_dir: any vlm-gym model directory (`vlmgym-convert` output).
    rubric: what a good answer is; part of every judging prompt.
    scale: the top score the judge is asked for (the reward is score / scale).
    dtype: the judge's weights ("bfloat16" or "float32").
    device: a device of its own for the judge (e.g. `jax.devices()[-1]`); default: the
        first device.
    template: the judging prompt, with fields {rubric}, {context}, {completion}, {scale}.
    """

    def __init__(
        self,
        model_dir: str | Path,
        rubric: str,
        *,
        scale: float = 10.0,
        max_new_tokens: int = 16,
        dtype: str = "bfloat16",
        device: Any = None,
        template: str = JUDGE_TEMPLATE,
        system_prompt: str | None = None,
    ) -> None:
        if not rubric.strip():
            raise ValueError("the judge needs a rubric")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if dtype not in ("bfloat16", "float32"):
            raise ValueError(f"dtype must be bfloat16 or float32, got {dtype!r}")
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"judge model directory {self.model_dir} has no config.json")
        self.rubric, self.scale, self.template = rubric, float(scale), template
        self.system_prompt = system_prompt
        self.max_new_tokens, self.dtype, self.device = max_new_tokens, dtype, device
        self.calls = self.judged = self.unparsed = 0
        self._model: tuple[Any, Any] | None = None
        self._lock = threading.Lock()  # rewards may be scored in a worker thread

    def _load(self) -> tuple[Any, Any]:
        """The judge's sampler and params, loaded on first use."""
        if self._model is None:
            import jax
            import jax.numpy as jnp
            from vlmgym_model import Processor, Sampler, load_model

            config, params = load_model(self.model_dir, dtype=getattr(jnp, self.dtype))
            if self.device is not None:
                params = jax.device_put(params, self.device)
            sampler = Sampler(config, Processor.from_model_dir(self.model_dir))
            self._model = (sampler, params)
        return self._model

    def prompts(self, completions: Sequence[str], **columns: Sequence[Any]) -> list[list[dict]]:
        """The judging conversation of each completion."""
        out = []
        for i, completion in enumerate(completions):
            context = ""
            question = _first(columns, QUESTION_COLUMNS, i)
            reference = _first(columns, REFERENCE_COLUMNS, i)
            if question:
                context += f"Question:\n{question}\n\n"
            if reference:
                context += f"Reference answer:\n{reference}\n\n"
            text = self.template.format(
                rubric=self.rubric,
                context=context,
                completion=str(completion)[:MAX_COMPLETION_CHARS],
                scale=int(self.scale) if self.scale.is_integer() else self.scale,
            )
            messages = [{"role": "user", "content": text}]
            if self.system_prompt:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            out.append(messages)
        return out

    def verdicts(self, completions: Sequence[str], **columns: Sequence[Any]) -> list[str]:
        """The judge's raw verdicts, one batched greedy generation."""
        import jax
        from vlmgym_model import SamplingParams

        if not completions:
            return []
        with self._lock:
            sampler, params = self._load()
            sampling = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0)
            gen = sampler.generate(
                params, self.prompts(completions, **columns), sampling, jax.random.key(0)
            )
            self.calls += 1
        return [group[0].text for group in gen.samples]

    def __call__(self, completions: Sequence[str], **columns: Sequence[Any]) -> list[float]:
        rewards = []
        for verdict in self.verdicts(completions, **columns):
            score = parse_score(verdict, self.scale)
            self.judged += 1
            if score is None:
                self.unparsed += 1
            rewards.append(0.0 if score is None else score)
        return rewards

    def __repr__(self) -> str:
        return f"ModelJudge({str(self.model_dir)!r}, scale={self.scale:g})"
