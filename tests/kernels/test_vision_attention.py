"""Vision attention: the block-sparse xla path and the Pallas kernel (interpreted) against
the dense reference, forward and gradients, on window layouts cut by image edges, on
whole-image (full-attention) layouts, and a check that the xla path never builds [P, P]."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from vlmgym_kernels import pallas_flash, reference, xla

IMPLS: dict[str, Callable[..., jax.Array]] = {
    "xla": xla.vision_attention,
    "pallas_interpret": functools.partial(pallas_flash.vision_attention, interpret=True, block=32),
}
if jax.default_backend() == "gpu":  # the same cases, compiled through Triton
    IMPLS["pallas"] = functools.partial(pallas_flash.vision_attention, block=32)

MERGE = 2  # patches per side of a merge unit
WINDOW = 2  # merge units per side of a window (4 x 4 = 16 patches per full window)


def window_segments(grids: list[tuple[int, int]], pad: int) -> tuple[np.ndarray, int]:
    """Segment ids in HF's window order for images of (h, w) merge units, plus `pad` zeros.

    Windows of WINDOW x WINDOW merge units tile each image from its top-left corner; the
    ones on the right and bottom edges are cut short when h or w is not a multiple of
    WINDOW. Tokens are ordered window by window, so each window is one contiguous run.
    Returns (int[P], the full window's patch count).
    """
    runs = []
    for h, w in grids:
        for r0 in range(0, h, WINDOW):
            for c0 in range(0, w, WINDOW):
                units = (min(WINDOW, h - r0)) * (min(WINDOW, w - c0))
                runs.append(units * MERGE * MERGE)
    seg = np.concatenate([np.full(n, i + 1, np.int32) for i, n in enumerate(runs)])
    return np.concatenate([seg, np.zeros(pad, np.int32)]), WINDOW * WINDOW * MERGE * MERGE


def image_segments(lengths: list[int], pad: int) -> np.ndarray:
    """One segment per image (the full-attention layers), plus `pad` zeros."""
    seg = np.concatenate([np.full(n, i + 1, np.int32) for i, n in enumerate(lengths)])
    return np.concatenate([seg, np.zeros(pad, np.int32)])


def _inputs(seed: int, P: int, N: int, H: int) -> tuple[jax.Array, ...]:
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    return tuple(jax.random.normal(kx, (P, N, H), jnp.float32) for kx in keys)  # [P, N, H]


# Two images of 3 x 5 and 2 x 3 merge units: windows of 16, 8 and 4 patches, 5 padding.
WINDOWS, WINDOW_LEN = window_segments([(3, 5), (2, 3)], pad=5)
# Two whole images (full-attention layer), the longest bounds the segment length.
IMAGES = image_segments([60, 24], pad=3)
LAYOUTS = {"windows": (WINDOWS, WINDOW_LEN), "images": (IMAGES, 60)}


@functools.partial(jax.jit, static_argnums=(0, 6))
def _run(fn: Callable[..., jax.Array], q, k, v, seg, ct, max_len: int | None):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg, max_segment_len=max_len), q, k, v)
    return out, vjp(ct)


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_vision_matches_reference(impl: str, layout: str, tol: dict[str, float]) -> None:
    seg_np, max_len = LAYOUTS[layout]
    seg = jnp.asarray(seg_np)
    q, k, v, ct = _inputs(0, seg.shape[0], 2, 20)
    want, want_grads = _run(reference.vision_attention, q, k, v, seg, ct, max_len)
    got, got_grads = _run(IMPLS[impl], q, k, v, seg, ct, max_len)
    np.testing.assert_allclose(got, want, atol=tol["float32"], rtol=0)
    for g, w, arg in zip(got_grads, want_grads, "qkv", strict=True):
        np.testing.assert_allclose(g, w, atol=tol["float32"], rtol=0, err_msg=f"d{arg}")
    assert (np.asarray(got)[seg_np == 0] == 0).all()


def test_vision_xla_unknown_segment_len(tol: dict[str, float]) -> None:
    """max_segment_len=None falls back to attention over all patches: still exact."""
    seg = jnp.asarray(WINDOWS)
    q, k, v, _ = _inputs(1, seg.shape[0], 2, 8)
    want = jax.jit(reference.vision_attention)(q, k, v, seg)
    got = jax.jit(xla.vision_attention)(q, k, v, seg)
    np.testing.assert_allclose(got, want, atol=tol["float32"], rtol=0)


def test_vision_bf16(tol: dict[str, float]) -> None:
    seg = jnp.asarray(WINDOWS)
    q, k, v = (x.astype(jnp.bfloat16) for x in _inputs(2, seg.shape[0], 2, 8)[:3])
    want = jax.jit(reference.vision_attention)(*(x.astype(jnp.float32) for x in (q, k, v)), seg)
    for fn in IMPLS.values():
        got = jax.jit(functools.partial(fn, max_segment_len=WINDOW_LEN))(q, k, v, seg)
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(got.astype(jnp.float32), want, atol=tol["bfloat16"], rtol=0)


def _largest_intermediate(jaxpr: jax.extend.core.Jaxpr) -> int:
    """Element count of the largest value any equation (nested ones included) produces."""
    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if isinstance(inner, jax.extend.core.Jaxpr):
                largest = max(largest, _largest_intermediate(inner))
    return largest


def test_vision_xla_never_builds_p_by_p() -> None:
    """Window layers at P = 4096: nothing as large as P * P, forward or backward."""
    P, N, H, L = 4096, 2, 8, 64
    seg = jnp.repeat(jnp.arange(1, P // L + 1, dtype=jnp.int32), L)  # [P]
    q = jnp.zeros((P, N, H), jnp.float32)

    def loss(q: jax.Array) -> jax.Array:
        return xla.vision_attention(q, q, q, seg, max_segment_len=L).sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss))(q).jaxpr
    largest = _largest_intermediate(jaxpr)
    assert largest < P * P // 8, f"an intermediate holds {largest} elements (P^2 = {P * P})"
    # The check can fail: the reference does build N * P * P scores.
    dense = _largest_intermediate(
        jax.make_jaxpr(lambda q: reference.vision_attention(q, q, q, seg))(q).jaxpr
    )
    assert dense >= P * P
