"""Pallas flash attention (forward and backward) for prefill, training and the vision tower.

One kernel family serves `attention` and `vision_attention`. Every query block i visits only
the key blocks in [kv_lo[b, i], kv_hi[b, i]) and, in the backward pass, every key block j only
the query blocks in [q_lo[b, j], q_hi[b, j]). The wrappers fill those ranges from the mask's
structure:

* causal prefill / training: key blocks up to the diagonal (shifted by S - T);
* vision: the contiguous segment runs (a window, or one image), so a window layer touches
  O(P * window) scores and a full-attention layer one block per image.

Inside a block the mask is exact (segment ids, padding id 0, causal positions), so the
ranges only decide which blocks are skipped, never the result.

Layout: q [B, T, N, H], k/v [B, S, K, H]; GQA reads kv head n // G for query head n (no
repeat). The head dim is zero-padded to a power of two >= 16 and T, S to block multiples
(Triton needs power-of-two tiles); padding carries segment id 0. Softmax statistics are
float32; the P @ V and dS @ K products take the inputs' dtype with float32 accumulation.
The backward pass computes dK, dV per query head and sums each group of G in XLA.

`interpret=True` runs the same kernels through Pallas' interpreter (CPU tests).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

# Finite "minus infinity" for masked scores: keeps max() and exp() free of inf - inf.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Static parameters of one flash-attention call (hashable: it keys the custom_vjp)."""

    scale: float
    causal: bool
    causal_offset: int  # query t sees key s iff s <= t + causal_offset (when causal)
    block_q: int
    block_k: int
    interpret: bool
    num_warps: int = 4
    num_stages: int = 2


def _dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [M, H] . b [N, H]^T -> float32 [M, N]."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [M, K] . b [K, N] -> float32 [M, N]."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [K, M]^T . b [K, N] -> float32 [M, N]."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _block_mask(
    q_seg: jax.Array, kv_seg: jax.Array, q_start: jax.Array, kv_start: jax.Array, cfg: FlashConfig
) -> jax.Array:
    """bool [bq, bk]: same non-zero segment, and causal when configured."""
    mask = (q_seg[:, None] == kv_seg[None, :]) & (q_seg[:, None] != 0)
    if cfg.causal:
        t_pos = q_start + cfg.causal_offset + lax.broadcasted_iota(jnp.int32, mask.shape, 0)
        s_pos = kv_start + lax.broadcasted_iota(jnp.int32, mask.shape, 1)
        mask = mask & (s_pos <= t_pos)
    return mask


def _forward_kernel(
    q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, lo_ref, hi_ref, o_ref, lse_ref, *, cfg: FlashConfig
) -> None:
    """One (b, n, query block): online softmax over key blocks [lo, hi)."""
    bq, bk = cfg.block_q, cfg.block_k
    q_start = pl.program_id(2) * bq
    q = q_ref[...]  # [bq, Hp]
    q_seg = q_seg_ref[...]  # [bq]

    def body(j, carry):
        acc, m_prev, l_prev = carry
        kv_slice = pl.ds(j * bk, bk)
        k = k_ref[kv_slice, :]  # [bk, Hp]
        v = v_ref[kv_slice, :]  # [bk, Hp]
        mask = _block_mask(q_seg, kv_seg_ref[kv_slice], q_start, j * bk, cfg)  # [bq, bk]
        s = jnp.where(mask, _dot_nt(q, k) * cfg.scale, _MASK_VALUE)  # [bq, bk]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        p = jnp.where(mask, jnp.exp(s - m_next[:, None]), 0.0)  # [bq, bk]
        correction = jnp.exp(m_prev - m_next)
        l_next = correction * l_prev + jnp.sum(p, axis=1)
        acc = correction[:, None] * acc + _dot_nn(p.astype(v.dtype), v)
        return acc, m_next, l_next

    acc = jnp.zeros(q.shape, jnp.float32)  # [bq, Hp]
    m = jnp.full((bq,), _MASK_VALUE, jnp.float32)
    l = jnp.zeros((bq,), jnp.float32)
    acc, m, l = lax.fori_loop(lo_ref[...], hi_ref[...], body, (acc, m, l))
    has_key = l > 0
    l_safe = jnp.where(has_key, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(has_key, m + jnp.log(l_safe), 0.0)


def _dq_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, lo_ref, hi_ref,
    dq_ref, *, cfg: FlashConfig,
) -> None:  # fmt: skip
    """dQ for one (b, n, query block), over key blocks [lo, hi)."""
    bk = cfg.block_k
    q_start = pl.program_id(2) * cfg.block_q
    q = q_ref[...]  # [bq, Hp]
    do = do_ref[...]  # [bq, Hp]
    lse = lse_ref[...]  # [bq]
    delta = delta_ref[...]  # [bq]
    q_seg = q_seg_ref[...]  # [bq]

    def body(j, dq):
        kv_slice = pl.ds(j * bk, bk)
        k = k_ref[kv_slice, :]  # [bk, Hp]
        v = v_ref[kv_slice, :]  # [bk, Hp]
        mask = _block_mask(q_seg, kv_seg_ref[kv_slice], q_start, j * bk, cfg)  # [bq, bk]
        s = jnp.where(mask, _dot_nt(q, k) * cfg.scale, _MASK_VALUE)
        p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)  # [bq, bk]
        ds = p * (_dot_nt(do, v) - delta[:, None])  # [bq, bk]
        return dq + _dot_nn(ds.astype(k.dtype), k)

    dq = lax.fori_loop(lo_ref[...], hi_ref[...], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, lo_ref, hi_ref,
    dk_ref, dv_ref, *, cfg: FlashConfig,
) -> None:  # fmt: skip
    """dK, dV of one (b, query head n, key block), over query blocks [lo, hi)."""
    bq = cfg.block_q
    kv_start = pl.program_id(2) * cfg.block_k
    k = k_ref[...]  # [bk, Hp]
    v = v_ref[...]  # [bk, Hp]
    kv_seg = kv_seg_ref[...]  # [bk]

    def body(i, carry):
        dk, dv = carry
        q_slice = pl.ds(i * bq, bq)
        q = q_ref[q_slice, :]  # [bq, Hp]
        do = do_ref[q_slice, :]  # [bq, Hp]
        lse = lse_ref[q_slice]  # [bq]
        delta = delta_ref[q_slice]  # [bq]
        mask = _block_mask(q_seg_ref[q_slice], kv_seg, i * bq, kv_start, cfg)  # [bq, bk]
        s = jnp.where(mask, _dot_nt(q, k) * cfg.scale, _MASK_VALUE)
        p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)  # [bq, bk]
        dv = dv + _dot_tn(p.astype(do.dtype), do)  # [bk, Hp]
        ds = p * (_dot_nt(do, v) - delta[:, None])  # [bq, bk]
        dk = dk + _dot_tn(ds.astype(q.dtype), q)  # [bk, Hp]
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(lo_ref[...], hi_ref[...], body, (zeros, zeros))
    dk_ref[...] = dk * cfg.scale
    dv_ref[...] = dv


def _compiler_params(cfg: FlashConfig) -> pl_triton.CompilerParams:
    # Triton's params select the Triton lowering on NVIDIA GPUs (not Mosaic GPU).
    return pl_triton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _forward_call(
    q, k, v, q_seg, kv_seg, kv_lo, kv_hi, cfg: FlashConfig
) -> tuple[jax.Array, jax.Array]:
    B, T, N, Hp = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    bq = cfg.block_q
    nq = T // bq
    scalar = pl.BlockSpec((None, None), lambda b, n, i: (b, i))
    return pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg),
        grid=(B, N, nq),
        in_specs=[
            pl.BlockSpec((None, bq, None, Hp), lambda b, n, i: (b, i, n, 0)),
            pl.BlockSpec((None, S, None, Hp), lambda b, n, i: (b, 0, n // G, 0)),
            pl.BlockSpec((None, S, None, Hp), lambda b, n, i: (b, 0, n // G, 0)),
            pl.BlockSpec((None, bq), lambda b, n, i: (b, i)),
            pl.BlockSpec((None, S), lambda b, n, i: (b, 0)),
            scalar,
            scalar,
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, Hp), lambda b, n, i: (b, i, n, 0)),
            pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),  # [B, T, N, Hp]
            jax.ShapeDtypeStruct((B, N, T), jnp.float32),  # lse
        ],
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="vlmgym_flash_forward",
    )(q, k, v, q_seg, kv_seg, kv_lo, kv_hi)


def _backward_calls(
    q, k, v, q_seg, kv_seg, kv_lo, kv_hi, q_lo, q_hi, o, lse, do, cfg: FlashConfig
) -> tuple[jax.Array, jax.Array, jax.Array]:
    B, T, N, Hp = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    bq, bk = cfg.block_q, cfg.block_k
    delta = jnp.einsum("BTNH,BTNH->BNT", o.astype(jnp.float32), do.astype(jnp.float32))  # [B, N, T]

    q_block = pl.BlockSpec((None, bq, None, Hp), lambda b, n, i: (b, i, n, 0))
    kv_full = pl.BlockSpec((None, S, None, Hp), lambda b, n, i: (b, 0, n // G, 0))
    row_block = pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(B, N, T // bq),
        in_specs=[
            q_block,
            kv_full,
            kv_full,
            q_block,
            row_block,
            row_block,
            pl.BlockSpec((None, bq), lambda b, n, i: (b, i)),
            pl.BlockSpec((None, S), lambda b, n, i: (b, 0)),
            pl.BlockSpec((None, None), lambda b, n, i: (b, i)),
            pl.BlockSpec((None, None), lambda b, n, i: (b, i)),
        ],
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),  # [B, T, N, Hp]
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="vlmgym_flash_dq",
    )(q, k, v, do, lse, delta, q_seg, kv_seg, kv_lo, kv_hi)

    q_full = pl.BlockSpec((None, T, None, Hp), lambda b, n, j: (b, 0, n, 0))
    kv_block = pl.BlockSpec((None, bk, None, Hp), lambda b, n, j: (b, j, n // G, 0))
    row_full = pl.BlockSpec((None, None, T), lambda b, n, j: (b, n, 0))
    dkv_block = pl.BlockSpec((None, bk, None, Hp), lambda b, n, j: (b, j, n, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(B, N, S // bk),
        in_specs=[
            q_full,
            kv_block,
            kv_block,
            q_full,
            row_full,
            row_full,
            pl.BlockSpec((None, T), lambda b, n, j: (b, 0)),
            pl.BlockSpec((None, bk), lambda b, n, j: (b, j)),
            pl.BlockSpec((None, None), lambda b, n, j: (b, j)),
            pl.BlockSpec((None, None), lambda b, n, j: (b, j)),
        ],
        out_specs=[dkv_block, dkv_block],
        out_shape=[
            jax.ShapeDtypeStruct((B, S, N, Hp), jnp.float32),  # dK per query head
            jax.ShapeDtypeStruct((B, S, N, Hp), jnp.float32),  # dV per query head
        ],
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="vlmgym_flash_dkv",
    )(q, k, v, do, lse, delta, q_seg, kv_seg, q_lo, q_hi)
    dk = dk.reshape(B, S, K, G, Hp).sum(axis=3)  # [B, S, K, Hp]
    dv = dv.reshape(B, S, K, G, Hp).sum(axis=3)  # [B, S, K, Hp]
    return dq, dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _flash(q, k, v, q_seg, kv_seg, kv_lo, kv_hi, q_lo, q_hi, cfg: FlashConfig) -> jax.Array:
    """Padded flash attention: q [B, T, N, Hp], k/v [B, S, K, Hp] -> [B, T, N, Hp]."""
    del q_lo, q_hi
    return _forward_call(q, k, v, q_seg, kv_seg, kv_lo, kv_hi, cfg)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, kv_lo, kv_hi, q_lo, q_hi, cfg: FlashConfig):
    o, lse = _forward_call(q, k, v, q_seg, kv_seg, kv_lo, kv_hi, cfg)
    return o, (q, k, v, q_seg, kv_seg, kv_lo, kv_hi, q_lo, q_hi, o, lse)


def _flash_bwd(cfg: FlashConfig, residuals, do):
    q, k, v, q_seg, kv_seg, kv_lo, kv_hi, q_lo, q_hi, o, lse = residuals
    dq, dk, dv = _backward_calls(q, k, v, q_seg, kv_seg, kv_lo, kv_hi, q_lo, q_hi, o, lse, do, cfg)
    return dq, dk, dv, None, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pow2_block(length: int, block: int) -> int:
    """The block for a sequence: `block`, or the next power of two >= length when smaller."""
    return max(16, min(block, int(pl.next_power_of_2(max(1, length)))))


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def _causal_ranges(
    T: int, S: int, bq: int, bk: int, offset: int, causal: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Static block ranges: key blocks per query block, query blocks per key block."""
    nq, nk = T // bq, S // bk
    kv_lo = np.zeros(nq, np.int32)
    q_hi = np.full(nk, nq, np.int32)
    if causal:
        last_q = (np.arange(nq) + 1) * bq - 1 + offset  # last visible key of each q block
        kv_hi = np.clip(last_q // bk + 1, 0, nk).astype(np.int32)
        first_q = np.arange(nk) * bk - offset  # first query that sees each key block
        q_lo = np.clip(first_q // bq, 0, nq).astype(np.int32)
    else:
        kv_hi = np.full(nq, nk, np.int32)
        q_lo = np.zeros(nk, np.int32)
    return kv_lo, kv_hi, q_lo, q_hi


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    *,
    causal: bool = True,
    scale: float | None = None,
    interpret: bool = False,
    block_q: int = 128,
    block_k: int = 128,
    num_warps: int = 4,
    num_stages: int = 2,
) -> jax.Array:
    """Flash attention with the contract of `reference.attention` (differentiable)."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    if N % K:
        raise ValueError(f"attention: {N} query heads are not a multiple of {K} kv heads")
    scale = H**-0.5 if scale is None else scale
    bq, bk = _pow2_block(T, block_q), _pow2_block(S, block_k)
    Tp, Sp, Hp = -(-T // bq) * bq, -(-S // bk) * bk, max(16, int(pl.next_power_of_2(H)))
    cfg = FlashConfig(
        scale=float(scale),
        causal=causal,
        causal_offset=S - T,
        block_q=bq,
        block_k=bk,
        interpret=interpret,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    ranges = _causal_ranges(Tp, Sp, bq, bk, S - T, causal)
    kv_lo, kv_hi, q_lo, q_hi = (
        jnp.broadcast_to(jnp.asarray(r), (B, r.shape[0])) for r in ranges
    )  # [B, nq] / [B, nk]
    qp = _pad_axis(_pad_axis(q, 1, Tp), 3, Hp)  # [B, Tp, N, Hp]
    kp = _pad_axis(_pad_axis(k, 1, Sp), 3, Hp)  # [B, Sp, K, Hp]
    vp = _pad_axis(_pad_axis(v, 1, Sp), 3, Hp)  # [B, Sp, K, Hp]
    q_seg = _pad_axis(q_segment_ids.astype(jnp.int32), 1, Tp)  # [B, Tp]
    kv_seg = _pad_axis(kv_segment_ids.astype(jnp.int32), 1, Sp)  # [B, Sp]
    out = _flash(qp, kp, vp, q_seg, kv_seg, kv_lo, kv_hi, q_lo, q_hi, cfg)
    return out[:, :T, :, :H]


def segment_block_ranges(
    segment_ids: jax.Array, block_q: int, block_k: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Block ranges of a non-causal self-attention whose segments are contiguous runs.

    segment_ids: int[P] with P a multiple of both blocks. A query attends only inside its
    own run, so query block i needs key blocks from the start of its first query's run to
    the end of its last query's run (and symmetrically for key blocks). Padding (id 0)
    attends nothing and counts as runs of length one.

    Returns kv_lo, kv_hi int32[P // block_q] and q_lo, q_hi int32[P // block_k].
    """
    P = segment_ids.shape[0]
    pos = jnp.arange(P, dtype=jnp.int32)
    prev = jnp.concatenate([jnp.full((1,), -1, segment_ids.dtype), segment_ids[:-1]])
    nxt = jnp.concatenate([segment_ids[1:], jnp.full((1,), -1, segment_ids.dtype)])
    is_start = (segment_ids != prev) | (segment_ids == 0)
    is_end = (segment_ids != nxt) | (segment_ids == 0)
    run_start = lax.cummax(jnp.where(is_start, pos, 0))  # [P] first index of the run
    run_end = lax.cummin(jnp.where(is_end, pos, P - 1), reverse=True) + 1  # [P] exclusive

    def ranges(block: int, other: int) -> tuple[jax.Array, jax.Array]:
        first = run_start[::block]  # [P // block]
        last = run_end[block - 1 :: block]  # [P // block]
        return first // other, -(-last // other)

    kv_lo, kv_hi = ranges(block_q, block_k)
    q_lo, q_hi = ranges(block_k, block_q)
    return kv_lo, kv_hi, q_lo, q_hi


def vision_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    max_segment_len: int | None = None,
    scale: float | None = None,
    interpret: bool = False,
    block: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> jax.Array:
    """Block-sparse vision attention with the contract of `reference.vision_attention`.

    Relies on the contract's contiguous segments: the visited key blocks follow each
    query block's runs (see `segment_block_ranges`), so `max_segment_len` is not needed.
    """
    del max_segment_len
    P, H = q.shape[0], q.shape[2]
    scale = H**-0.5 if scale is None else scale
    b = _pow2_block(P, block)
    Pp, Hp = -(-P // b) * b, max(16, int(pl.next_power_of_2(H)))
    cfg = FlashConfig(
        scale=float(scale),
        causal=False,
        causal_offset=0,
        block_q=b,
        block_k=b,
        interpret=interpret,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    seg = _pad_axis(segment_ids.astype(jnp.int32), 0, Pp)  # [Pp]
    kv_lo, kv_hi, q_lo, q_hi = (r[None] for r in segment_block_ranges(seg, b, b))  # [1, nb]

    def prep(x: jax.Array) -> jax.Array:
        return _pad_axis(_pad_axis(x, 0, Pp), 2, Hp)[None]  # [1, Pp, N, Hp]

    out = _flash(prep(q), prep(k), prep(v), seg[None], seg[None], kv_lo, kv_hi, q_lo, q_hi, cfg)
    return out[0, :P, :, :H]
