"""Pallas decode attention: one new query per row against a ragged KV cache.

Grid (B, K): each program takes the G query heads that share kv head k of row b, so the
cache is read once per kv head (GQA without repeats), and walks only the key blocks that
overlap the row's valid range [start, length). The G heads are zero-padded to a power of
two >= 16 and the head dim likewise (Triton's tile rules); S is padded to a block multiple.
Forward only: the sampling engine never differentiates through decode.

`interpret=True` runs the same kernel through Pallas' interpreter (CPU tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def _decode_kernel(
    q_ref, k_ref, v_ref, start_ref, length_ref, o_ref, *, scale: float, block_k: int
) -> None:
    """One (b, k): online softmax of G query heads over key blocks covering [start, length)."""
    bk = block_k
    nk = k_ref.shape[0] // bk
    q = q_ref[...]  # [Gp, Hp]
    start = start_ref[...]
    length = length_ref[...]

    def body(j, carry):
        acc, m_prev, l_prev = carry
        kv_slice = pl.ds(j * bk, bk)
        k = k_ref[kv_slice, :]  # [bk, Hp]
        v = v_ref[kv_slice, :]  # [bk, Hp]
        s_pos = j * bk + lax.broadcasted_iota(jnp.int32, (q.shape[0], bk), 1)
        mask = (s_pos >= start) & (s_pos < length)  # [Gp, bk]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s = jnp.where(mask, s * scale, _MASK_VALUE)  # [Gp, bk]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        p = jnp.where(mask, jnp.exp(s - m_next[:, None]), 0.0)
        correction = jnp.exp(m_prev - m_next)
        l_next = correction * l_prev + jnp.sum(p, axis=1)
        pv = lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )  # [Gp, Hp]
        return correction[:, None] * acc + pv, m_next, l_next

    lo = lax.div(jnp.maximum(start, 0), bk)
    hi = jnp.minimum(lax.div(jnp.maximum(length, 0) + bk - 1, bk), nk)
    acc = jnp.zeros(q.shape, jnp.float32)  # [Gp, Hp]
    m = jnp.full((q.shape[0],), _MASK_VALUE, jnp.float32)
    l = jnp.zeros((q.shape[0],), jnp.float32)
    acc, m, l = lax.fori_loop(lo, jnp.maximum(lo, hi), body, (acc, m, l))
    o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    starts: jax.Array | None = None,
    *,
    scale: float | None = None,
    interpret: bool = False,
    block_k: int = 128,
    num_warps: int = 4,
    num_stages: int = 2,
) -> jax.Array:
    """Decode attention with the contract of `reference.decode_attention`."""
    B, N, H = q.shape
    K, S = k.shape[1], k.shape[2]
    if N % K:
        raise ValueError(f"decode_attention: {N} query heads are not a multiple of {K} kv heads")
    G = N // K
    scale = H**-0.5 if scale is None else scale
    bk = max(16, min(block_k, int(pl.next_power_of_2(S))))
    Sp = -(-S // bk) * bk
    Gp = max(16, int(pl.next_power_of_2(G)))
    Hp = max(16, int(pl.next_power_of_2(H)))
    qg = jnp.pad(q.reshape(B, K, G, H), ((0, 0), (0, 0), (0, Gp - G), (0, Hp - H)))
    # qg: [B, K, Gp, Hp]
    kp = jnp.pad(k, ((0, 0), (0, 0), (0, Sp - S), (0, Hp - H)))  # [B, K, Sp, Hp]
    vp = jnp.pad(v, ((0, 0), (0, 0), (0, Sp - S), (0, Hp - H)))  # [B, K, Sp, Hp]
    lengths = lengths.astype(jnp.int32)
    starts = jnp.zeros_like(lengths) if starts is None else starts.astype(jnp.int32)
    scalar = pl.BlockSpec((None,), lambda b, h: (b,))
    kv_spec = pl.BlockSpec((None, None, Sp, Hp), lambda b, h: (b, h, 0, 0))
    q_spec = pl.BlockSpec((None, None, Gp, Hp), lambda b, h: (b, h, 0, 0))
    out = pl.pallas_call(
        functools.partial(_decode_kernel, scale=float(scale), block_k=bk),
        grid=(B, K),
        in_specs=[q_spec, kv_spec, kv_spec, scalar, scalar],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),  # [B, K, Gp, Hp]
        compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="vlmgym_decode_attention",
    )(qg, kp, vp, starts, jnp.minimum(lengths, S))
    return out[:, :, :G, :H].reshape(B, N, H)
