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
