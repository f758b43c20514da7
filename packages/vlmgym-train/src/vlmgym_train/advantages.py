"""Advantage estimators: rewards of G groups of n samples -> one advantage per sample.

Every estimator is a pure jnp function registered under a name:

    fn(rewards: float[G, n], *, eps: float = 1e-6, **estimator_kwargs) -> float[G, n]

Row g holds the rewards of the n completions sampled for prompt g. Flatten the result
group-major (`adv.reshape(-1)`: sample j of group g lands at index g * n + j) to get the
per-sequence `advantages: float[B]` that `vlmgym_train.losses` takes.

Registered: `grpo`, `dr_grpo`, `rloo`, `reinforce`, `reinforce_plus_plus`. Register your own
with `@register_advantage("name")`; the trainer picks one with `get_advantage(name)`.

`dynamic_sampling_mask` marks the groups that carry a learning signal (DAPO's dynamic
sampling keeps only those and refills the batch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


class AdvantageFn(Protocol):
    """`fn(rewards: float[G, n], *, eps=1e-6, **kwargs) -> float[G, n]`."""

    def __call__(self, rewards: ArrayLike, *, eps: float = 1e-6) -> jax.Array: ...


F = TypeVar("F", bound=Callable[..., jax.Array])

ADVANTAGES: dict[str, Callable[..., jax.Array]] = {}
"""name -> advantage estimator. Read it to list the choices; add with `register_advantage`."""


def register_advantage(name: str, *, overwrite: bool = False) -> Callable[[F], F]:
    """Decorator: register an advantage estimator under `name` (case-insensitive).

    Registering a taken name raises `ValueError` unless `overwrite=True`.
    """
    key = name.strip().lower()

    def decorator(fn: F) -> F:
        if key in ADVANTAGES and not overwrite:
            raise ValueError(f"advantage estimator {key!r} is already registered")
        ADVANTAGES[key] = fn
        return fn

    return decorator


def get_advantage(name: str) -> Callable[..., jax.Array]:
    """The advantage estimator registered under `name`; `KeyError` lists the choices."""
    key = name.strip().lower()
    if key not in ADVANTAGES:
        raise KeyError(
            f"unknown advantage estimator {name!r}; registered: {', '.join(sorted(ADVANTAGES))}"
        )
    return ADVANTAGES[key]


def _as_groups(rewards: ArrayLike) -> jax.Array:
    r = jnp.asarray(rewards, jnp.float32)
    if r.ndim != 2:
        raise ValueError(f"rewards must be float[G, n] (groups x samples), got shape {r.shape}")
    return r


@register_advantage("grpo")
def grpo(rewards: ArrayLike, *, eps: float = 1e-6, ddof: int = 0) -> jax.Array:
    """GRPO (Shao et al. 2024): rewards normalised within each group.

        A[g, i] = (r[g, i] - mean_j r[g, j]) / (std_j r[g, j] + eps)

    `std` is the population std (`ddof=0`); `ddof=1` gives the unbiased std that TRL and
    verl use (torch's default), which needs n >= 2. A group whose rewards are all equal gets
    A = 0.

    rewards: float[G, n] -> float[G, n]
    """
    r = _as_groups(rewards)
    mean = r.mean(axis=1, keepdims=True)  # [G, 1]
    std = r.std(axis=1, keepdims=True, ddof=ddof)  # [G, 1]
    return (r - mean) / (std + eps)


@register_advantage("dr_grpo")
def dr_grpo(rewards: ArrayLike, *, eps: float = 1e-6) -> jax.Array:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): no std division.

        A[g, i] = r[g, i] - mean_j r[g, j]

    Dividing by the group std up-weights groups that are nearly all right or all wrong; Dr.
    GRPO drops it (and pairs it with the "constant" loss aggregation). `eps` is unused.

    rewards: float[G, n] -> float[G, n]
    """
    del eps
    r = _as_groups(rewards)
    return r - r.mean(axis=1, keepdims=True)


@register_advantage("rloo")
def rloo(rewards: ArrayLike, *, eps: float = 1e-6) -> jax.Array:
    """RLOO (Ahmadian et al. 2024): leave-one-out baseline, the mean of the other samples.

        A[g, i] = r[g, i] - 1/(n-1) * sum_{j != i} r[g, j]
                = n/(n-1) * (r[g, i] - mean_j r[g, j])

    The baseline does not depend on sample i, so the estimate stays unbiased. Needs n >= 2.
    `eps` is unused.

    rewards: float[G, n] -> float[G, n]
    """
    del eps
    r = _as_groups(rewards)
    n = r.shape[1]
    if n < 2:
        raise ValueError(f"rloo needs at least 2 samples per group, got n={n}")
    others = (r.sum(axis=1, keepdims=True) - r) / (n - 1)  # [G, n]
    return r - others


@register_advantage("reinforce")
def reinforce(rewards: ArrayLike, *, eps: float = 1e-6, baseline: bool = True) -> jax.Array:
    """REINFORCE with the batch-mean baseline (groups ignored).

        A[g, i] = r[g, i] - mean_{g', j} r[g', j]      (baseline=True)
        A[g, i] = r[g, i]                               (baseline=False)

    `eps` is unused.

    rewards: float[G, n] -> float[G, n]
    """
    del eps
    r = _as_groups(rewards)
    return r - r.mean() if baseline else r


@register_advantage("reinforce_plus_plus")
def reinforce_plus_plus(
    rewards: ArrayLike, *, eps: float = 1e-6, group_baseline: bool = False
) -> jax.Array:
    """REINFORCE++ (Hu 2025): rewards whitened over the whole batch.

        A[g, i] = (r[g, i] - mean_{g', j} r[g', j]) / (std_{g', j} r[g', j] + eps)

    With `group_baseline=True` (REINFORCE++-baseline) the group mean is subtracted first and
    the result is divided by the batch std of those centred rewards:

        c[g, i] = r[g, i] - mean_j r[g, j];   A[g, i] = c[g, i] / (std_{g', j} c[g', j] + eps)

    rewards: float[G, n] -> float[G, n]
    """
    r = _as_groups(rewards)
    if group_baseline:
        c = r - r.mean(axis=1, keepdims=True)
        return c / (c.std() + eps)
    return (r - r.mean()) / (r.std() + eps)


def dynamic_sampling_mask(rewards: ArrayLike, *, atol: float = 0.0) -> jax.Array:
    """DAPO's dynamic sampling filter: True for the groups whose rewards are not all equal.

        keep[g] = max_i r[g, i] - min_i r[g, i] > atol

    A group of equal rewards has zero advantage under every group-relative estimator and only
    dilutes the batch; DAPO drops such groups and samples more prompts until the batch is
    full (the trainer does the refilling).

    rewards: float[G, n] -> bool[G]
    """
    r = _as_groups(rewards)
    return (r.max(axis=1) - r.min(axis=1)) > atol
