"""Masked keys with huge scores: every impl's output and gradients stay finite and exact.

Real checkpoints produce attention scores in the thousands. A key that a query must not
see (padding, the causal future, another image's window) can score far above everything
the query does see; an implementation that takes the exp of a masked score before zeroing
it overflows to inf there, and its backward pass multiplies 0 by inf. Here the keys a
query must not see score +1e4 against it. A big key that some query may see scores -1e4
against that query (its weight underflows to exactly 0 in every impl): a big visible
score would only test fp32's precision at 1e4 (gradients of 1e3 and more), not the masking.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from vlmgym_kernels import pallas_decode, pallas_flash, reference, xla

BIG = 1e4  # the score a big key gets from every query

ATTENTION: dict[str, Callable[..., jax.Array]] = {
    "xla": xla.attention,
    "pallas_interpret": functools.partial(
        pallas_flash.attention, interpret=True, block_q=8, block_k=8
    ),
}
VISION: dict[str, Callable[..., jax.Array]] = {
    "xla": functools.partial(xla.vision_attention, max_segment_len=8),
    "xla_dense": xla.vision_attention,
    "pallas_interpret": functools.partial(pallas_flash.vision_attention, interpret=True, block=8),
}
DECODE: dict[str, Callable[..., jax.Array]] = {
    "xla": xla.decode_attention,
    "pallas_interpret": functools.partial(pallas_decode.decode_attention, interpret=True),
}
if jax.default_backend() == "gpu":  # the same cases, compiled through Triton
    ATTENTION["pallas"] = functools.partial(pallas_flash.attention, block_q=8, block_k=8)
    VISION["pallas"] = functools.partial(pallas_flash.vision_attention, block=8)
    DECODE["pallas"] = pallas_decode.decode_attention


def _adversarial(
    key: jax.Array, q_shape: tuple[int, ...], k_shape: tuple[int, ...], sees_big: np.ndarray
) -> tuple[jax.Array, jax.Array]:
    """Random q, k (head dim last) where component 0 separates two kinds of query.

    Queries that see no big key get q[..., 0] = 1; those that do see one get -1. A big key
    (see `_make_big`) has k[..., 0] = BIG * sqrt(H), so it scores about +1e4 against the
    first kind (for whom it is masked) and about -1e4 against the second.
    `sees_big`: bool array over q's leading (position) axes.
    """
    kq, kk = jax.random.split(key)
    q = np.array(jax.random.normal(kq, q_shape, jnp.float32))
    k = np.array(jax.random.normal(kk, k_shape, jnp.float32))
    q[..., 0] = np.where(sees_big, -1.0, 1.0)[(...,) + (None,) * (len(q_shape) - 1 - sees_big.ndim)]
    k[..., 0] = 0.0
    return q, k


def _make_big(k: np.ndarray, index: tuple) -> None:
    """Make the keys at `index` big (see `_adversarial`)."""
    k[(*index, Ellipsis, 0)] = BIG * k.shape[-1] ** 0.5


def _check_grads(got, want, got_out, want_out, tol: float) -> None:
    np.testing.assert_allclose(got_out, want_out, atol=tol, rtol=0)
    for g, w, arg in zip(got, want, "qkv", strict=True):
        assert np.isfinite(np.asarray(g)).all(), f"d{arg} has non-finite values"
        np.testing.assert_allclose(g, w, atol=tol, rtol=0, err_msg=f"d{arg}")


@functools.partial(jax.jit, static_argnums=(0, 1))
def _vjp(fn: Callable[..., jax.Array], causal: bool | None, q, k, v, q_seg, kv_seg, ct):
    def f(q, k, v):
        if causal is None:  # vision: one segment-id array
            return fn(q, k, v, q_seg)
        return fn(q, k, v, q_seg, kv_seg, causal=causal)

    out, pullback = jax.vjp(f, q, k, v)
    return out, pullback(ct)


@pytest.mark.parametrize("impl", sorted(ATTENTION))
def test_attention_grads_finite_with_huge_masked_scores(impl: str, tol: dict[str, float]) -> None:
    B, T, N, K, H = 4, 16, 4, 2, 8
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    seg = np.zeros((B, T), np.int32)
    seg[0, 5:] = 1  # left padding
    seg[1, :11] = 1  # right padding
    seg[2, :7], seg[2, 7:13] = 1, 2  # two packed sequences, then padding
    # row 3: all padding, no query sees any key
    future = {0: 9, 1: 6, 2: 4}  # a big key in each row, masked for the queries before it
    sees_big = np.zeros((B, T), bool)
    for b, p in future.items():
        sees_big[b] = (np.arange(T) >= p) & (seg[b] == seg[b, p])
    q, k = _adversarial(keys[0], (B, T, N, H), (B, T, K, H), sees_big)
    _make_big(k, (seg == 0,))  # padding keys: masked for every query
    for b, p in future.items():
        _make_big(k, (b, p))
    v = jax.random.normal(keys[1], (B, T, K, H), jnp.float32)
    ct = jax.random.normal(keys[2], (B, T, N, H), jnp.float32)
    q, k, seg = jnp.asarray(q), jnp.asarray(k), jnp.asarray(seg)

    # The test is adversarial: some masked score is >= BIG, no visible one is near it.
    scores = np.einsum("btkgh,bskh->bkgts", np.asarray(q).reshape(B, T, K, N // K, H), k)
    visible = np.asarray(reference.attention(q, k, v, seg, seg) != 0).any(-1)  # [B, T]
    assert scores.max() / H**0.5 > 0.99 * BIG and visible.any()

    want, want_grads = _vjp(reference.attention, True, q, k, v, seg, seg, ct)
    got, got_grads = _vjp(ATTENTION[impl], True, q, k, v, seg, seg, ct)
    assert np.isfinite(np.asarray(want)).all()
    _check_grads(got_grads, want_grads, got, want, tol["float32"])


@pytest.mark.parametrize("impl", sorted(VISION))
def test_vision_attention_grads_finite_with_huge_masked_scores(
    impl: str, tol: dict[str, float]
) -> None:
    P, N, H = 40, 2, 8
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    seg = np.zeros(P, np.int32)
    seg[:8], seg[8:16], seg[16:22], seg[22:30] = 1, 2, 3, 4  # windows; the rest is padding
    sees_big = (seg == 1) | (seg == 3)
    q, k = _adversarial(keys[0], (P, N, H), (P, N, H), sees_big)
    _make_big(k, (seg == 0,))
    _make_big(k, (3,))  # one big key in windows 1 and 3: masked for the other windows
    _make_big(k, (20,))
    v = jax.random.normal(keys[1], (P, N, H), jnp.float32)
    ct = jax.random.normal(keys[2], (P, N, H), jnp.float32)
    q, k, seg = jnp.asarray(q), jnp.asarray(k), jnp.asarray(seg)

    want, want_grads = _vjp(reference.vision_attention, None, q, k, v, seg, seg, ct)
    got, got_grads = _vjp(VISION[impl], None, q, k, v, seg, seg, ct)
    _check_grads(got_grads, want_grads, got, want, tol["float32"])


@pytest.mark.parametrize("impl", sorted(DECODE))
def test_decode_attention_finite_with_huge_masked_keys(impl: str, tol: dict[str, float]) -> None:
    """Decode is forward-only; its masked slots (left padding, beyond the length, an empty
    row) hold huge keys and must not leak into the output."""
    B, N, K, S, H = 3, 4, 2, 16, 8
    keys = jax.random.split(jax.random.PRNGKey(2), 2)
    q, k = _adversarial(keys[0], (B, N, H), (B, K, S, H), np.zeros((B,), bool))
    starts = jnp.array([3, 0, 0], jnp.int32)
    lengths = jnp.array([12, 7, 0], jnp.int32)  # row 2 is empty
    for b in range(B):
        _make_big(k, (b, slice(None), slice(0, int(starts[b]))))
        _make_big(k, (b, slice(None), slice(int(lengths[b]), None)))
    v = jax.random.normal(keys[1], (B, K, S, H), jnp.float32)
    q, k = jnp.asarray(q), jnp.asarray(k)
    want = jax.jit(reference.decode_attention)(q, k, v, lengths, starts)
    got = jax.jit(DECODE[impl])(q, k, v, lengths, starts)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, want, atol=tol["float32"], rtol=0)
    assert (np.asarray(got)[2] == 0).all(), "an empty row outputs zeros"
