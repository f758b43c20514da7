"""Advantage estimators: rewards of G groups of n samples -> one advantage per sample.

Every estimator is a pure jnp function registered under a name:

    fn(rewards: float[G, n], *, eps: float = 1e-6, **estimator_kwargs) -> float[G, n]

Row g holds the rewards of the n completions sampled for prompt g. Flatten the result
group-major (`adv.reshape(-1)`: sample j of group g lands at index g * n + j) to get the
per-sequence `advantages: float[B]` that `vlmgym_train.losses` takes.

Registered: `grpo`, `dr_grpo`, `rloo`, `reinforce`, `reinforce_plus_plus`. Register your own
with `@register_advantage("name")`; the trainer picks one with `get_advantage(name)` and passes
`ddof` and `scale` only to estimators whose signature names them.

Every estimator that subtracts a mean gives exactly 0 to a group (or batch) of equal rewards:
the mean is taken of differences to one member, which are exactly 0 there (see `_centre`).

`dynamic_sampling_mask` marks the groups that carry a learning signal (DAPO's dynamic
sampling keeps only those and refills the batch). After the estimator, the trainer can
whiten the advantages over the whole batch (`global_normalise`) and clip them
(`clip_advantages`), in that order, as the original project's first version did.

Credit over turns: a multi-turn trajectory (tool calls, retries) is one sample of its
group. Its reward is the sum of its turns' rewards (a final answer's score, minus any
per-call costs), the estimator gives the trajectory one advantage A, and each of its
turns' training rows gets it: turn k of T gets gamma^(T-1-k) * A with `--turn_discount`
gamma (`discount_turns`; 1, the default, gives every turn A, as verl's and TRL's multi-turn
GRPO do). A discount below 1 credits the turns nearest the outcome most.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

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


def _centre(r: jax.Array, axis: int | None) -> jax.Array:
    """r - mean(r) along `axis`, exactly 0 wherever the values along `axis` are all equal.

        c = d - mean(d),   d = r - r[first]      (mathematically r - mean(r))

    A float32 mean of equal values need not equal them (mean([0.1] * 3) != 0.1), so
    `r - r.mean()` can leave a rounding residue that the std division then blows up to
    ~1e-2. Subtracting one member first makes every d exactly 0 in an all-equal group
    (x - x == 0 in IEEE arithmetic), so their mean and c are exactly 0 too.
    """
    first = r[:, :1] if axis == 1 else r.reshape(-1)[0]
    d = r - first  # [G, n]
    return d - d.mean(axis=axis, keepdims=axis is not None)


def _std(c: jax.Array, axis: int | None, ddof: int) -> jax.Array:
    """std of centred values c: sqrt(sum c^2 / (count - ddof)); exactly 0 when all c are 0."""
    count = c.size if axis is None else c.shape[axis]
    if count - ddof < 1:
        raise ValueError(f"the std over {count} rewards needs more than ddof={ddof} of them")
    return jnp.sqrt((c * c).sum(axis=axis, keepdims=axis is not None) / (count - ddof))


SCALES: tuple[str, ...] = ("group", "batch", "none")


@register_advantage("grpo")
def grpo(
    rewards: ArrayLike, *, eps: float = 1e-6, ddof: int = 0, scale: str = "group"
) -> jax.Array:
    """GRPO (Shao et al. 2024): rewards centred within each group, optionally scaled.

        c[g, i] = r[g, i] - mean_j r[g, j]
        A[g, i] = c[g, i] / (std_j r[g, j] + eps)            scale="group" (GRPO)
                = c[g, i] / (std_{g', j} r[g', j] + eps)     scale="batch" (Lite PPO)
                = c[g, i]                                    scale="none"  (Dr. GRPO)

    `ddof` picks the std: 0 the population std (our default), 1 the unbiased std that TRL
    and verl use (torch's default; needs n >= 2). TRL's `scale_rewards` has these three
    meanings; it adds eps=1e-4, verl eps=1e-6. A group whose rewards are all equal gets
    A = 0 exactly, whatever the values and the scale (see `_centre`).

    rewards: float[G, n] -> float[G, n]
    """
    r = _as_groups(rewards)
    c = _centre(r, axis=1)  # [G, n]
    if scale == "group":
        return c / (_std(c, 1, ddof) + eps)
    if scale == "batch":
        return c / (_std(_centre(r, axis=None), None, ddof) + eps)
    if scale == "none":
        return c
    raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")


@register_advantage("dr_grpo")
def dr_grpo(rewards: ArrayLike, *, eps: float = 1e-6) -> jax.Array:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): no std division.

        A[g, i] = r[g, i] - mean_j r[g, j]

    Dividing by the group std up-weights groups that are nearly all right or all wrong; Dr.
    GRPO drops it (and pairs it with the "constant" loss aggregation). The same as `grpo`
    with scale="none"; `eps` is unused. All-equal groups get exactly 0.

    rewards: float[G, n] -> float[G, n]
    """
    del eps
    return _centre(_as_groups(rewards), axis=1)


@register_advantage("rloo")
def rloo(rewards: ArrayLike, *, eps: float = 1e-6) -> jax.Array:
    """RLOO (Ahmadian et al. 2024): leave-one-out baseline, the mean of the other samples.

        A[g, i] = r[g, i] - 1/(n-1) * sum_{j != i} r[g, j]
                = n/(n-1) * (r[g, i] - mean_j r[g, j])

    The baseline does not depend on sample i, so the estimate stays unbiased. Needs n >= 2.
    Computed as the second form, so all-equal groups get exactly 0. `eps` is unused.

    rewards: float[G, n] -> float[G, n]
    """
    del eps
    r = _as_groups(rewards)
    n = r.shape[1]
    if n < 2:
        raise ValueError(f"rloo needs at least 2 samples per group, got n={n}")
    return _centre(r, axis=1) * (n / (n - 1))


@register_advantage("reinforce")
def reinforce(rewards: ArrayLike, *, eps: float = 1e-6, baseline: bool = True) -> jax.Array:
    """REINFORCE with the batch-mean baseline (groups ignored).

        A[g, i] = r[g, i] - mean_{g', j} r[g', j]      (baseline=True)
        A[g, i] = r[g, i]                               (baseline=False)

    A batch of equal rewards gets exactly 0. `eps` is unused.

    rewards: float[G, n] -> float[G, n]
    """
    del eps
    r = _as_groups(rewards)
    return _centre(r, axis=None) if baseline else r


@register_advantage("reinforce_plus_plus")
def reinforce_plus_plus(
    rewards: ArrayLike, *, eps: float = 1e-6, ddof: int = 0, group_baseline: bool = False
) -> jax.Array:
    """REINFORCE++ (Hu 2025): rewards whitened over the whole batch.

        A[g, i] = (r[g, i] - mean_{g', j} r[g', j]) / (std_{g', j} r[g', j] + eps)

    With `group_baseline=True` (REINFORCE++-baseline) the group mean is subtracted first and
    the result is divided by the batch std of those centred rewards:

        c[g, i] = r[g, i] - mean_j r[g, j];   A[g, i] = c[g, i] / (std_{g', j} c[g', j] + eps)

    `ddof` as in `grpo`. Equal rewards (in the batch, or in a group with the baseline) get
    exactly 0.

    rewards: float[G, n] -> float[G, n]
    """
    r = _as_groups(rewards)
    if group_baseline:
        c = _centre(r, axis=1)  # [G, n]
        return c / (_std(c - c.mean(), None, ddof) + eps)
    c = _centre(r, axis=None)  # [G, n]
    return c / (_std(c, None, ddof) + eps)


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


def global_normalise(advantages: ArrayLike, *, eps: float = 1e-6) -> jax.Array:
    """Whiten advantages over the whole batch, after the per-group estimator.

        A'[g, i] = (A[g, i] - mean_{g', j} A[g', j]) / (std_{g', j} A[g', j] + eps)

    The population std (ddof 0), as the original project's `do_global_normalization`. A batch
    of equal advantages (all groups uninformative) gets exactly 0.

    advantages: float[G, n] -> float[G, n]
    """
    a = _as_groups(advantages)
    c = _centre(a, axis=None)
    return c / (_std(c, None, 0) + eps)


def parse_clip_range(text: str) -> tuple[float, float]:
    """An advantage clip range from the command line: "C" is [-C, C], "LOW,HIGH" is
    [LOW, HIGH] ("inf" allowed: "0,inf" keeps only non-negative advantages)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1 and values[0] > 0:
        return -values[0], values[0]
    if len(values) == 2 and values[0] < values[1]:
        return values[0], values[1]
    raise ValueError(
        f"--advantage_clip {text!r}: give C > 0 (clip to [-C, C]) or LOW,HIGH with LOW < HIGH"
    )


def clip_advantages(advantages: ArrayLike, low: float, high: float) -> jax.Array:
    """Advantages clipped to [low, high] (`jnp.clip`; NaN stays NaN)."""
    return jnp.clip(jnp.asarray(advantages, jnp.float32), low, high)


def discount_turns(row_advantages: np.ndarray, trajectory: np.ndarray, gamma: float) -> np.ndarray:
    """float32[R]: each row's advantage times gamma^(turns after it in its trajectory).

    row_advantages: float[R], the advantage of each row's trajectory; trajectory: int[R],
    which trajectory each row belongs to, its rows in turn order (as `build_batch` lays
    them out)."""
    adv = np.asarray(row_advantages, np.float32)
    if gamma == 1.0:
        return adv
    owner = np.asarray(trajectory)
    later = np.zeros(len(owner), np.int64)
    for t in np.unique(owner):
        rows = np.flatnonzero(owner == t)
        later[rows] = np.arange(len(rows))[::-1]  # turns after each row's turn
    return (adv * np.float32(gamma) ** later).astype(np.float32)
