"""One dispatch per kernel: the caller names the implementation explicitly."""

from __future__ import annotations

import jax

from vlmgym_kernels import reference

IMPLS = ("xla", "reference")


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLS}")


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    *,
    causal: bool = True,
    scale: float | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Prefill / training attention; see `reference.attention` for the contract."""
    _check_impl(impl)
    return reference.attention(
        q, k, v, q_segment_ids, kv_segment_ids, causal=causal, scale=scale
    )


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    starts: jax.Array | None = None,
    *,
    scale: float | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Decode attention over a ragged KV cache; see `reference.decode_attention`."""
    _check_impl(impl)
    return reference.decode_attention(q, k, v, lengths, starts, scale=scale)


def vision_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    max_segment_len: int | None = None,
    scale: float | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Block-diagonal vision attention; see `reference.vision_attention`."""
    _check_impl(impl)
    return reference.vision_attention(
        q, k, v, segment_ids, max_segment_len=max_segment_len, scale=scale
    )
