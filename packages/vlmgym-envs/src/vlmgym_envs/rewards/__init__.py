"""Rewards as a library: TRL-style batched reward functions, registered by name.

    fn(completions: list[str], **columns: list[Any]) -> list[float]

`completions` holds the sampled texts (TRL's chat form, a list of messages, also works);
each column is a list aligned with them holding the dataset row's value (`answer=[...]`,
`choices=[...]`). A reward reads the columns it needs by name and ignores the rest; a
missing one is a ValueError naming it and the columns the row has. Every registered reward
scores each completion in [0, 1], returns one float per completion and never raises on a
completion's text (empty, 100,000 characters, unbalanced braces, control characters).

    from vlmgym_envs.rewards import resolve_reward
    reward = resolve_reward({"math": 1.0, "format": 0.1})    # or "math", ["math", "format"]
    reward(["<think>...</think><answer>\\frac{1}{2}</answer>"], answer=["0.5"])  # [1.1]

Registered: `math` (math-verify equivalence, bounded in time by a worker process, see
`verifier`), `choice` (multiple-choice letter), `exact` (normalised string equality),
`numeric` (final number within a tolerance; `numeric_reward(abs_tol, rel_tol)` makes
others), `format` (R1's `<think>...</think><answer>...</answer>`), `boxed_format` (one
`\\boxed{}`). `extract` holds the answer extraction they share (`final_answer`,
`extract_boxed`). Rewards built from options by name (`REWARD_FACTORIES`, `make_reward`):
`judge`, a second model scoring against a rubric (`vlmgym_train.judge.ModelJudge`).
Importing this package starts no process and imports no sympy.
"""

from vlmgym_envs.rewards.choice import choice_reward
from vlmgym_envs.rewards.equivalence import make_math_reward, math_reward
from vlmgym_envs.rewards.exact import exact_reward
from vlmgym_envs.rewards.extract import answer_block, extract_boxed, final_answer, find_boxed
from vlmgym_envs.rewards.numeric import numeric_reward
from vlmgym_envs.rewards.registry import (
    REWARD_FACTORIES,
    REWARDS,
    RewardFn,
    combine,
    get_reward,
    make_reward,
    register_reward,
    resolve_reward,
)
from vlmgym_envs.rewards.structure import boxed_format_reward, format_reward
from vlmgym_envs.rewards.verifier import MathVerifier, MathVerifierError, default_verifier

__all__ = [
    "REWARDS",
    "REWARD_FACTORIES",
    "MathVerifier",
    "MathVerifierError",
    "RewardFn",
    "answer_block",
    "boxed_format_reward",
    "choice_reward",
    "combine",
    "default_verifier",
    "exact_reward",
    "extract_boxed",
    "final_answer",
    "find_boxed",
    "format_reward",
    "get_reward",
    "make_math_reward",
    "make_reward",
    "math_reward",
    "numeric_reward",
    "register_reward",
    "resolve_reward",
]
