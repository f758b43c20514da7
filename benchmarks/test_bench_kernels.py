"""Attention kernels: each impl against the reference, in the same process.

Shapes come from `VLMGYM_BENCH_SHAPES`: "small" (default, sized for a 2-core CPU) or "7b"
(Qwen2.5-VL-7B: prefill of 4k tokens, decode of 64 rows against a 4k cache, the vision
tower's attention on a 1024 x 1024 image). On CPU only the "xla" impl's gain over the
reference means something; "pallas" runs only where JAX's default backend is a GPU, and
"jax_sdpa" (`jax.nn.dot_product_attention`, cuDNN on GPU) is XLA's own attention, the
baseline for the Pallas kernels. Each result carries TFLOP/s in `extra_info`.

    VLMGYM_BENCH_SHAPES=7b uv run pytest benchmarks/test_bench_kernels.py --benchmark-only
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import vlmgym_kernels


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Benchmark shapes; dimension letters as in STYLE.md."""

    prefill: tuple[int, int, int, int, int]  # B, T, N, K, H (S == T, causal)
    decode: tuple[int, int, int, int, int]  # B, S, N, K, H
    vision: tuple[int, int, int, int]  # image side in pixels, N, H, window patches


SHAPES = {
    "small": Shapes(prefill=(1, 1024, 8, 2, 64), decode=(8, 1024, 8, 2, 64),
                    vision=(448, 4, 80, 64)),
    "7b": Shapes(prefill=(1, 4096, 28, 4, 128), decode=(64, 4096, 28, 4, 128),
                 vision=(1024, 16, 80, 64)),
}  # fmt: skip


def _shapes() -> Shapes:
    name = os.environ.get("VLMGYM_BENCH_SHAPES", "small")
    if name not in SHAPES:
        raise ValueError(f"VLMGYM_BENCH_SHAPES={name!r}; choose one of {sorted(SHAPES)}")
    return SHAPES[name]


def _impls() -> list[str]:
    impls = ["reference", "xla"]
    if jax.default_backend() == "gpu":
        impls += ["pallas", "jax_sdpa"]
    return impls


DTYPE = jnp.bfloat16


def _normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32).astype(DTYPE)


def _time(benchmark, fn: Callable[..., jax.Array], args: tuple, flops: float) -> None:
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))  # warm-up
    benchmark.pedantic(
        lambda: jax.block_until_ready(compiled(*args)), rounds=5, iterations=1, warmup_rounds=1
    )
    benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.mean / 1e12


@pytest.mark.parametrize("impl", _impls())
def test_prefill(benchmark, impl: str) -> None:
    B, T, N, K, H = _shapes().prefill
    benchmark.group = f"prefill B{B} T{T} N{N} K{K} H{H}"
    q, k, v = _normal(0, (B, T, N, H)), _normal(1, (B, T, K, H)), _normal(2, (B, T, K, H))
    seg = jnp.ones((B, T), jnp.int32)  # [B, T]
    if impl == "jax_sdpa":

        def fn(q, k, v, seg):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    else:

        def fn(q, k, v, seg):
            return vlmgym_kernels.attention(q, k, v, seg, seg, causal=True, impl=impl)

    _time(benchmark, fn, (q, k, v, seg), flops=2 * B * N * T * T * H)  # causal: half of 4BNTSH


@pytest.mark.parametrize("impl", [i for i in _impls() if i != "jax_sdpa"])
def test_train_step_attention(benchmark, impl: str) -> None:
    """Forward and backward of causal attention on the prefill shape, at a quarter length."""
    B, T, N, K, H = _shapes().prefill
    T = T // 4
    benchmark.group = f"train fwd+bwd B{B} T{T} N{N} K{K} H{H}"
    q, k, v = _normal(0, (B, T, N, H)), _normal(1, (B, T, K, H)), _normal(2, (B, T, K, H))
    seg = jnp.ones((B, T), jnp.int32)  # [B, T]

    def fn(q, k, v, seg):
        def loss(q, k, v):
            out = vlmgym_kernels.attention(q, k, v, seg, seg, causal=True, impl=impl)
            return out.astype(jnp.float32).sum()

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    _time(benchmark, fn, (q, k, v, seg), flops=2 * B * N * T * T * H * 3.5)


@pytest.mark.parametrize("impl", [i for i in _impls() if i != "jax_sdpa"])
def test_decode(benchmark, impl: str) -> None:
    B, S, N, K, H = _shapes().decode
    benchmark.group = f"decode B{B} S{S} N{N} K{K} H{H}"
    q, k, v = _normal(0, (B, N, H)), _normal(1, (B, K, S, H)), _normal(2, (B, K, S, H))
    lengths = jnp.asarray(np.random.default_rng(0).integers(S // 2, S + 1, B), jnp.int32)

    def fn(q, k, v, lengths):
        return vlmgym_kernels.decode_attention(q, k, v, lengths, impl=impl)

    flops = 4 * N * H * float(lengths.sum())
    _time(benchmark, fn, (q, k, v, lengths), flops=flops)


@pytest.mark.parametrize("layout", ["copied", "shared"])
def test_group_decode(benchmark, layout: str) -> None:
    """Group sampling: the decode shape's rows as B/8 prompts x 8 samples, their prompt
    (the first S - 64 slots) either copied to every sample (`decode_attention`) or stored
    once per prompt (`prefix_decode_attention`); xla impl."""
    B, S, N, K, H = _shapes().decode
    n = 8
    P, T, G = max(1, B // n), S - 64, 64  # prompts, prompt slots, generated slots
    R = P * n
    benchmark.group = f"group decode {P}x{n} rows, prompt {T} + {G} own slots"
    q = _normal(0, (R, N, H))
    prefix_k, prefix_v = _normal(1, (P, K, T, H)), _normal(2, (P, K, T, H))
    k, v = _normal(3, (R, K, G, H)), _normal(4, (R, K, G, H))
    lengths = jnp.full((R,), G // 2, jnp.int32)
    starts = jnp.zeros((P,), jnp.int32)
    if layout == "shared":

        def fn(q, prefix_k, prefix_v, k, v):
            return vlmgym_kernels.prefix_decode_attention(
                q, prefix_k, prefix_v, starts, k, v, lengths, impl="xla"
            )

        args = (q, prefix_k, prefix_v, k, v)
    else:
        full_k = jnp.concatenate([jnp.repeat(prefix_k, n, axis=0), k], axis=2)
        full_v = jnp.concatenate([jnp.repeat(prefix_v, n, axis=0), v], axis=2)

        def fn(q, full_k, full_v):
            return vlmgym_kernels.decode_attention(
                q, full_k, full_v, T + lengths, jnp.repeat(starts, n), impl="xla"
            )

        args = (q, full_k, full_v)
    _time(benchmark, fn, args, flops=4 * N * H * R * (T + G // 2))


def _vision_layout(side: int, window: int) -> tuple[np.ndarray, int]:
    """Window segment ids of one side x side image (14 px patches, 2 x 2 merge) in HF order."""
    units = -(-side // 28)  # merge units per side (the processor rounds to multiples of 28)
    per_side = int(np.sqrt(window // 4))  # merge units per window side
    runs = [
        min(per_side, units - r) * min(per_side, units - c) * 4
        for r in range(0, units, per_side)
        for c in range(0, units, per_side)
    ]
    seg = np.concatenate([np.full(n, i + 1, np.int32) for i, n in enumerate(runs)])
    return seg, int(sum(n * n for n in runs))


@pytest.mark.parametrize("layer", ["window", "full"])
@pytest.mark.parametrize("impl", [i for i in _impls() if i != "jax_sdpa"])
def test_vision(benchmark, impl: str, layer: str) -> None:
    side, N, H, window = _shapes().vision
    seg, pair_count = _vision_layout(side, window)
    P = seg.shape[0]
    if layer == "full":
        seg, pair_count, max_len = np.ones_like(seg), P * P, P
    else:
        max_len = window
    benchmark.group = f"vision {layer} P{P} N{N} H{H}"
    q, k, v = (_normal(i, (P, N, H)) for i in range(3))

    def fn(q, k, v, seg):
        return vlmgym_kernels.vision_attention(q, k, v, seg, max_segment_len=max_len, impl=impl)

    _time(benchmark, fn, (q, k, v, jnp.asarray(seg)), flops=4 * N * H * pair_count)
