"""Reward shaping and loss masks of DAPO: overlong filtering and the soft overlong penalty."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def mask_truncated(mask: ArrayLike, truncated: ArrayLike) -> jax.Array:
    """DAPO's overlong filtering: drop completions cut at the length limit from the loss.

        mask'[b, t] = mask[b, t] * (1 - truncated[b])

    A truncated completion never reached its stop token, so its reward says little about
    its tokens. mask: [B, T] (bool or float), truncated: bool[B] -> same dtype as mask.
    """
    mask = jnp.asarray(mask)
    keep = ~jnp.asarray(truncated, jnp.bool_)  # [B]
    return jnp.where(keep[:, None], mask, jnp.zeros_like(mask))


def overlong_penalty(
    lengths: ArrayLike, max_len: int, buffer: int, penalty: float = 1.0
) -> jax.Array:
    """DAPO's soft overlong punishment, added to the reward of each completion.

        R(L) = 0                                       L <= max_len - buffer
             = -penalty * (L - (max_len - buffer)) / buffer    max_len - buffer < L <= max_len
             = -penalty                                L > max_len

    lengths: int[B] (completion tokens) -> float[B]. DAPO: max_len=20480, buffer=4096,
    penalty=1.
    """
    if not 0 < buffer <= max_len:
        raise ValueError(f"need 0 < buffer <= max_len, got buffer={buffer}, max_len={max_len}")
    lengths = jnp.asarray(lengths, jnp.float32)
    over = (lengths - (max_len - buffer)) / buffer  # [B]
    return -penalty * jnp.clip(over, 0.0, 1.0)
