"""Prefill / training attention: the xla path and the Pallas kernel (interpreted) against
the reference, forward and gradients, over GQA ratios, odd lengths, T != S, packed and
fully padded rows, and bf16 inputs."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from vlmgym_kernels import pallas_flash, reference, xla

# Small blocks so the interpreted kernel walks several query and key blocks.
IMPLS: dict[str, Callable[..., jax.Array]] = {
    "xla": xla.attention,
    "pallas_interpret": functools.partial(
        pallas_flash.attention, interpret=True, block_q=16, block_k=16
    ),
}
if jax.default_backend() == "gpu":  # the same cases, compiled through Triton
    IMPLS["pallas"] = functools.partial(pallas_flash.attention, block_q=16, block_k=16)


def _segments(rows: list[list[int]], length: int) -> jax.Array:
    """Each row as run lengths of segments 1, 2, ...; the rest is padding (0). -> int[B, L]."""
    out = np.zeros((len(rows), length), np.int32)
    for b, runs in enumerate(rows):
        pos = 0
        for sid, run in enumerate(runs, start=1):
            out[b, pos : pos + run] = sid
            pos += run
    return jnp.asarray(out)


def _inputs(
    seed: int, B: int, T: int, S: int, N: int, K: int, H: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    kq, kk, kv, kc = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(kq, (B, T, N, H), jnp.float32)  # [B, T, N, H]
    k = jax.random.normal(kk, (B, S, K, H), jnp.float32)  # [B, S, K, H]
    v = jax.random.normal(kv, (B, S, K, H), jnp.float32)  # [B, S, K, H]
    ct = jax.random.normal(kc, (B, T, N, H), jnp.float32)  # cotangent [B, T, N, H]
    return q, k, v, ct


# (name, B, T, S, N, K, H, causal, q runs per row, kv runs per row)
CASES = [
    # GQA 1, odd length, one row with several segments, one row fully padded.
    ("mha_odd_len", 2, 13, 13, 2, 2, 8, True, [[5, 4, 3], []], None),
    # GQA 2, queries are the last T of S keys (prefill after a cache), left padding as id 0.
    ("gqa2_offset", 2, 8, 21, 4, 2, 16, True, None, None),
    # GQA 4, non-causal, packed rows spanning several 16-blocks, head dim not a power of 2.
    ("gqa4_packed", 1, 40, 40, 4, 1, 24, False, [[17, 1, 12, 9]], None),
]


def _case_segments(name: str, B: int, T: int, S: int, q_runs, kv_runs):
    if name == "gqa2_offset":
        kv = np.zeros((B, S), np.int32)
        kv[0, 3:] = 1  # row 0: 3 left-padding slots, then one sequence
        kv[1, :10], kv[1, 10:] = 1, 2  # row 1: two packed sequences
        kv = jnp.asarray(kv)
        return kv[:, S - T :], kv
    q = _segments(q_runs, T)
    return q, (q if kv_runs is None else _segments(kv_runs, S))


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_attention_matches_reference(impl: str, case: tuple, tol: dict[str, float]) -> None:
    name, B, T, S, N, K, H, causal, q_runs, kv_runs = case
    q, k, v, ct = _inputs(0, B, T, S, N, K, H)
    q_seg, kv_seg = _case_segments(name, B, T, S, q_runs, kv_runs)

    @functools.partial(jax.jit, static_argnums=0)
    def run(fn: Callable[..., jax.Array], q, k, v, q_seg, kv_seg, ct):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, q_seg, kv_seg, causal=causal), q, k, v)
        return out, vjp(ct)

    want, want_grads = run(reference.attention, q, k, v, q_seg, kv_seg, ct)
    got, got_grads = run(IMPLS[impl], q, k, v, q_seg, kv_seg, ct)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, atol=tol["float32"], rtol=0)
    for g, w, arg in zip(got_grads, want_grads, "qkv", strict=True):
        assert np.isfinite(np.asarray(g)).all(), f"d{arg} has non-finite values"
        np.testing.assert_allclose(g, w, atol=tol["float32"], rtol=0, err_msg=f"d{arg}")

    padded_q = np.asarray(q_seg) == 0  # [B, T]
    assert (np.asarray(got)[padded_q] == 0).all(), "padding queries must output zeros"
    assert (np.asarray(got_grads[0])[padded_q] == 0).all(), "padding queries get zero dq"
    if name == "mha_odd_len":  # row 1 is fully padded: no gradient reaches its keys either
        assert (np.asarray(got_grads[1])[1] == 0).all() and (np.asarray(got_grads[2])[1] == 0).all()


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_attention_bf16_more_queries_than_keys(impl: str, tol: dict[str, float]) -> None:
    """bf16 inputs, causal with T > S: the first T - S queries see no key and output zeros."""
    B, T, S, N, K, H = 1, 24, 16, 4, 2, 16
    q, k, v, _ = _inputs(1, B, T, S, N, K, H)
    q_seg, kv_seg = jnp.ones((B, T), jnp.int32), _segments([[10, 6]], S)
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    got = jax.jit(IMPLS[impl])(q16, k16, v16, q_seg, kv_seg)
    assert got.dtype == jnp.bfloat16
    assert (np.asarray(got.astype(jnp.float32))[:, : T - S] == 0).all()
    # The reference sees the same bf16-rounded values, in fp32.
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q16, k16, v16))
    want = jax.jit(reference.attention)(q32, k32, v32, q_seg, kv_seg)
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=tol["bfloat16"], rtol=0)


def test_xla_attention_query_chunks(monkeypatch: pytest.MonkeyPatch, tol: dict[str, float]) -> None:
    """Force many query chunks (each reading its causal key prefix): same values and grads."""
    monkeypatch.setattr(xla, "_CHUNK_SCORE_ELEMENTS", 1)
    monkeypatch.setattr(xla, "_MIN_CHUNK", 8)
    B, T, S, N, K, H = 2, 21, 29, 4, 2, 8
    q, k, v, ct = _inputs(2, B, T, S, N, K, H)
    kv_seg = _segments([[9, 12, 8], [25]], S)
    q_seg = kv_seg[:, S - T :]

    @functools.partial(jax.jit, static_argnums=0)
    def run(fn: Callable[..., jax.Array], q, k, v, q_seg, kv_seg, ct):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, q_seg, kv_seg, causal=True), q, k, v)
        return out, vjp(ct)

    want, want_grads = run(reference.attention, q, k, v, q_seg, kv_seg, ct)
    got, got_grads = run(xla.attention, q, k, v, q_seg, kv_seg, ct)
    np.testing.assert_allclose(got, want, atol=tol["float32"], rtol=0)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=tol["float32"], rtol=0)
