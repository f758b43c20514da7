"""Decode attention: the xla path and the Pallas kernel (interpreted) against the reference
over GQA ratios, ragged lengths and starts (including an empty row), an odd cache length
spanning several key blocks, and bf16 inputs."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from vlmgym_kernels import pallas_decode, reference, xla

IMPLS: dict[str, Callable[..., jax.Array]] = {
    "xla": xla.decode_attention,
    # Small key blocks: the kernel walks (and skips) several blocks per row.
    "pallas_interpret": functools.partial(
        pallas_decode.decode_attention, interpret=True, block_k=16
    ),
}
if jax.default_backend() == "gpu":  # the same cases, compiled through Triton
    IMPLS["pallas"] = functools.partial(pallas_decode.decode_attention, block_k=16)

B, S, H = 4, 37, 8
LENGTHS = jnp.array([37, 20, 0, 33], jnp.int32)  # row 2 is empty: output zeros
STARTS = jnp.array([0, 5, 0, 17], jnp.int32)  # row 3's first 17 slots are left padding


def _inputs(seed: int, N: int, K: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (B, N, H), jnp.float32)  # [B, N, H]
    k = jax.random.normal(kk, (B, K, S, H), jnp.float32)  # [B, K, S, H]
    v = jax.random.normal(kv, (B, K, S, H), jnp.float32)  # [B, K, S, H]
    return q, k, v


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("N,K", [(4, 4), (4, 2), (8, 2)], ids=["G1", "G2", "G4"])
def test_decode_matches_reference(impl: str, N: int, K: int, tol: dict[str, float]) -> None:
    q, k, v = _inputs(0, N, K)
    want = jax.jit(reference.decode_attention)(q, k, v, LENGTHS, STARTS)
    got = jax.jit(IMPLS[impl])(q, k, v, LENGTHS, STARTS)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, atol=tol["float32"], rtol=0)
    assert (np.asarray(got)[2] == 0).all(), "a row with no valid key must output zeros"


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_decode_bf16_without_starts(impl: str, tol: dict[str, float]) -> None:
    q, k, v = (x.astype(jnp.bfloat16) for x in _inputs(1, 8, 2))
    got = jax.jit(IMPLS[impl])(q, k, v, LENGTHS)
    assert got.dtype == jnp.bfloat16
    want = jax.jit(reference.decode_attention)(*(x.astype(jnp.float32) for x in (q, k, v)), LENGTHS)
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=tol["bfloat16"], rtol=0)


# Shared-prefix decode attention: P prompts x n samples, each prompt's cache stored once.
P, N_SAMPLES, T_PREFIX, S_OWN = 3, 2, 11, 6
PREFIX_STARTS = jnp.array([0, 4, 11], jnp.int32)  # prompt 2's prefix is all padding
OWN_LENGTHS = jnp.array([6, 1, 0, 3, 0, 5], jnp.int32)  # row 4: no valid key at all


def _prefix_inputs(seed: int, N: int, K: int, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    R = P * N_SAMPLES
    q = jax.random.normal(ks[0], (R, N, H))
    pk = jax.random.normal(ks[1], (P, K, T_PREFIX, H))
    pv = jax.random.normal(ks[2], (P, K, T_PREFIX, H))
    k = jax.random.normal(ks[3], (R, K, S_OWN, H))
    v = jax.random.normal(ks[4], (R, K, S_OWN, H))
    return tuple(x.astype(dtype) for x in (q, pk, pv, k, v))


@pytest.mark.parametrize("N,K", [(4, 4), (8, 2)], ids=["G1", "G4"])
def test_prefix_decode_matches_reference(N: int, K: int, tol: dict[str, float]) -> None:
    q, pk, pv, k, v = _prefix_inputs(2, N, K)
    args = (q, pk, pv, PREFIX_STARTS, k, v, OWN_LENGTHS)
    want = jax.jit(reference.prefix_decode_attention)(*args)
    got = jax.jit(xla.prefix_decode_attention)(*args)
    assert got.shape == want.shape == q.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, atol=tol["float32"], rtol=0)
    assert (np.asarray(got)[4] == 0).all(), "a row with no valid key must output zeros"
    assert np.abs(np.asarray(got)[5]).max() > 0  # prefix empty, own keys valid
    # The reference itself: row 0 (prompt 0, sample 0) is plain decode attention over its
    # prompt's cache followed by its own keys.
    full_k = jnp.concatenate([pk[0], k[0]], axis=1)[None]
    full_v = jnp.concatenate([pv[0], v[0]], axis=1)[None]
    row0 = reference.decode_attention(
        q[:1], full_k, full_v, jnp.array([T_PREFIX + 6]), PREFIX_STARTS[:1]
    )
    np.testing.assert_allclose(want[:1], row0, atol=tol["float32"], rtol=0)


def test_prefix_decode_bf16(tol: dict[str, float]) -> None:
    q, pk, pv, k, v = _prefix_inputs(3, 8, 2, jnp.bfloat16)
    got = jax.jit(xla.prefix_decode_attention)(q, pk, pv, PREFIX_STARTS, k, v, OWN_LENGTHS)
    assert got.dtype == jnp.bfloat16
    f32 = (x.astype(jnp.float32) for x in (q, pk, pv))
    want = reference.prefix_decode_attention(
        *f32, PREFIX_STARTS, k.astype(jnp.float32), v.astype(jnp.float32), OWN_LENGTHS
    )
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=tol["bfloat16"], rtol=0)


def test_prefix_decode_rejects_rows_that_are_not_groups() -> None:
    q, pk, pv, k, v = _prefix_inputs(4, 4, 2)
    with pytest.raises(ValueError, match="multiple of 3 prompts"):
        xla.prefix_decode_attention(q[:5], pk, pv, PREFIX_STARTS, k[:5], v[:5], OWN_LENGTHS[:5])
