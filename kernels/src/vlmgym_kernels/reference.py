"""Plain-jnp reference attention, the ground truth every kernel is tested against.

Shapes: B batch, T query length, S key length, N query heads, K kv heads, G = N // K,
H head dim, P vision patches. Softmax statistics are always float32. A query that may
attend to no key (a padding row) returns zeros, never NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _masked_softmax_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float
) -> jax.Array:
    """q [B, T, K, G, H], k/v [B, S, K, H], mask [B, T, S] -> [B, T, K, G, H] (q's dtype)."""
    scores = jnp.einsum(
        "BTKGH,BSKH->BKGTS", q.astype(jnp.float32), k.astype(jnp.float32)
    )  # [B, K, G, T, S]
    scores = scores * scale
    mask = mask[:, None, None, :, :]  # [B, 1, 1, T, S]
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.where(mask, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", weights, v.astype(jnp.float32))  # [B, T, K, G, H]
    return out.astype(q.dtype)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    *,
    causal: bool = True,
    scale: float | None = None,
) -> jax.Array:
    """Multi-head attention with GQA, padding and packing through segment ids.

    Args:
      q: float[B, T, N, H] queries.
      k, v: float[B, S, K, H] keys and values; N must be a multiple of K.
      q_segment_ids: int[B, T]; kv_segment_ids: int[B, S]. A query attends to a key only
        when both carry the same segment id and that id is not 0 (0 marks padding).
      causal: when true, query i attends to key j only if j <= i + (S - T), i.e. the
        queries are the last T positions of the S keys.
      scale: softmax scale, 1 / sqrt(H) by default.

    Returns:
      float[B, T, N, H] in q's dtype; rows with no key to attend to are zero.
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    if N % K:
        raise ValueError(f"attention: {N} query heads are not a multiple of {K} kv heads")
    scale = H**-0.5 if scale is None else scale
    mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (
        q_segment_ids[:, :, None] != 0
    )  # [B, T, S]
    if causal:
        q_idx = jnp.arange(T)[:, None] + (S - T)
        kv_idx = jnp.arange(S)[None, :]
        mask = mask & (kv_idx <= q_idx)[None]
    out = _masked_softmax_attention(q.reshape(B, T, K, N // K, H), k, v, mask, scale)
    return out.reshape(B, T, N, H)


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    starts: jax.Array | None = None,
    *,
    scale: float | None = None,
) -> jax.Array:
    """One new query per row against a KV cache with ragged valid ranges.

    Args:
      q: float[B, N, H], the new token's queries.
      k, v: float[B, K, S, H], the cache, kv heads before slots (the new token's own k/v
        already written).
      lengths: int[B]; key j of row b is valid when starts[b] <= j < lengths[b].
      starts: int[B] or None (0): first valid cache slot, e.g. after left padding.

    Returns:
      float[B, N, H] in q's dtype.
    """
    B, N, H = q.shape
    K, S = k.shape[1], k.shape[2]
    if N % K:
        raise ValueError(f"decode_attention: {N} query heads are not a multiple of {K} kv heads")
    scale = H**-0.5 if scale is None else scale
    idx = jnp.arange(S)[None, :]
    valid = idx < lengths[:, None]
    if starts is not None:
        valid = valid & (idx >= starts[:, None])
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, S, K, H]
    out = _masked_softmax_attention(q.reshape(B, 1, K, N // K, H), k, v, valid[:, None, :], scale)
    return out.reshape(B, N, H)


def prefix_decode_attention(
    q: jax.Array,
    prefix_k: jax.Array,
    prefix_v: jax.Array,
    prefix_starts: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    scale: float | None = None,
) -> jax.Array:
    """Decode attention for groups of rows that share a prompt's cache (group sampling).

    Row r = p * n + j is sample j of prompt p. It attends to prompt p's cache, stored once
    for its n samples, followed by its own keys (the tokens it generated).

    Args:
      q: float[R, N, H], R = P * n.
      prefix_k, prefix_v: float[P, K, T, H], each prompt's cache; slot j of prompt p is
        valid when j >= prefix_starts[p] (left padding before).
      prefix_starts: int[P].
      k, v: float[R, K, S, H], each row's own keys; slot j of row r is valid when
        j < lengths[r].
      lengths: int[R].

    Returns:
      float[R, N, H] in q's dtype: `decode_attention` over the concatenation, prefix first.
    """
    R, P, T = q.shape[0], prefix_k.shape[0], prefix_k.shape[2]
    if R % P:
        raise ValueError(f"prefix_decode_attention: {R} rows are not a multiple of {P} prompts")
    n = R // P
    full_k = jnp.concatenate([jnp.repeat(prefix_k, n, axis=0), k], axis=2)  # [R, K, T + S, H]
    full_v = jnp.concatenate([jnp.repeat(prefix_v, n, axis=0), v], axis=2)
    starts = jnp.repeat(prefix_starts, n)
    return decode_attention(q, full_k, full_v, T + lengths, starts, scale=scale)


def vision_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    max_segment_len: int | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Block-diagonal (non-causal) attention over the patches of a vision tower layer.

    Args:
      q, k, v: float[P, N, H] (vision attention has as many kv heads as query heads).
      segment_ids: int[P]; patches attend within their own segment (a window, or a whole
        image in full-attention layers). Segments are contiguous runs; 0 marks padding.
      max_segment_len: static upper bound on a segment's length, which structured
        implementations use; the reference ignores it.

    Returns:
      float[P, N, H] in q's dtype.
    """
    del max_segment_len
    out = attention(
        q[None],
        k[None],
        v[None],
        segment_ids[None],
        segment_ids[None],
        causal=False,
        scale=scale,
    )
    return out[0]
