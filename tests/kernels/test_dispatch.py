"""The dispatch: every impl name reaches its implementation, unknown names and Pallas on a
non-GPU backend fail with a useful message, and the Pallas kernels lower to Triton for
NVIDIA GPUs (checked without one)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import vlmgym_kernels


def _tiny() -> tuple[jax.Array, ...]:
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (1, 12, 4, 8), jnp.float32)  # [B, T, N, H]
    k = jax.random.normal(keys[1], (1, 12, 2, 8), jnp.float32)  # [B, S, K, H]
    v = jax.random.normal(keys[2], (1, 12, 2, 8), jnp.float32)  # [B, S, K, H]
    return q, k, v


def cache_layout(k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, S, K, H] keys and values as a decode cache: [B, K, S, H]."""
    return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


CPU_IMPLS = [i for i in vlmgym_kernels.IMPLS if i != "pallas"]


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_dispatch_reaches_each_impl(impl: str, tol: dict[str, float]) -> None:
    q, k, v = _tiny()
    seg = jnp.array([[1] * 7 + [2] * 5], jnp.int32)
    lengths = jnp.array([9], jnp.int32)

    def all_three(q: jax.Array, k: jax.Array, v: jax.Array, impl: str) -> tuple[jax.Array, ...]:
        return (
            vlmgym_kernels.attention(q, k, v, seg, seg, impl=impl),
            vlmgym_kernels.decode_attention(q[:, 0], *cache_layout(k, v), lengths, impl=impl),
            # Vision attention has as many kv heads as query heads.
            vlmgym_kernels.vision_attention(
                q[0, :, :2], k[0], v[0], seg[0], max_segment_len=7, impl=impl
            ),
        )

    run = jax.jit(all_three, static_argnums=3)
    got, want = run(q, k, v, impl), run(q, k, v, "reference")
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=tol["float32"], rtol=0)


def test_unknown_impl_is_rejected() -> None:
    q, k, v = _tiny()
    seg = jnp.ones((1, 12), jnp.int32)
    with pytest.raises(ValueError, match="choose one of"):
        vlmgym_kernels.attention(q, k, v, seg, seg, impl="triton")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="pallas runs on GPUs")
def test_pallas_off_gpu_names_the_alternatives() -> None:
    q, k, v = _tiny()
    seg = jnp.ones((1, 12), jnp.int32)
    with pytest.raises(ValueError, match=r"impl=.xla.*pallas_interpret"):
        vlmgym_kernels.attention(q, k, v, seg, seg, impl="pallas")
    with pytest.raises(ValueError, match="NVIDIA GPU"):
        vlmgym_kernels.decode_attention(q[:, 0], *cache_layout(k, v), jnp.array([3]), impl="pallas")
    with pytest.raises(ValueError, match="NVIDIA GPU"):
        vlmgym_kernels.vision_attention(q[0], q[0], q[0], seg[0], impl="pallas")


def test_pallas_kernels_lower_to_triton() -> None:
    """Lowering for CUDA runs the Pallas -> Triton lowering (tile shapes, ops) on any host."""
    from vlmgym_kernels import pallas_decode, pallas_flash

    bf16, i32 = jnp.bfloat16, jnp.int32
    q = jax.ShapeDtypeStruct((1, 200, 4, 80), bf16)  # odd T, head dim not a power of 2
    k = jax.ShapeDtypeStruct((1, 300, 2, 80), bf16)
    q_seg, kv_seg = jax.ShapeDtypeStruct((1, 200), i32), jax.ShapeDtypeStruct((1, 300), i32)

    def train(q, k, v, q_seg, kv_seg):
        def loss(q, k, v):
            return pallas_flash.attention(q, k, v, q_seg, kv_seg).astype(jnp.float32).sum()

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    def decode(q, k, v, lengths):
        return pallas_decode.decode_attention(q, k, v, lengths, lengths // 2)

    def vision(q, seg):
        return pallas_flash.vision_attention(q, q, q, seg, max_segment_len=64)

    cases = [
        (train, (q, k, k, q_seg, kv_seg), 3),
        (decode, (jax.ShapeDtypeStruct((3, 28, 128), bf16),
                  *[jax.ShapeDtypeStruct((3, 4, 100, 128), bf16)] * 2,
                  jax.ShapeDtypeStruct((3,), i32)), 1),
        (vision, (jax.ShapeDtypeStruct((330, 16, 80), bf16), jax.ShapeDtypeStruct((330,), i32)), 1),
    ]  # fmt: skip
    for fn, args, n_kernels in cases:
        hlo = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert hlo.count("xla.gpu.triton") == n_kernels, fn.__name__
