"""Attention kernels on the device: correctness against the reference and TFLOP/s.

Four cases, at Qwen2.5-VL-7B shapes (`benchmarks/test_bench_kernels.py`'s "7b" entry):

* flash forward: causal prefill attention, q [B, T, N, H], k/v [B, T, K, H];
* flash backward: the gradient of sum(out * cotangent) in q, k and v (the timed function
  runs the forward and the backward, so its FLOPs are 3.5x the forward's: 2 matmuls
  forward, 5 backward);
* decode: one query per row against a ragged cache, q [B, N, H], k/v [B, K, S, H];
* vision windows: block-diagonal attention over a 1024 px image's windows of 8 x 8 patches,
  q/k/v [P, N, H].

Every implementation gets the same bf16 inputs; the reference (`vlmgym_kernels.reference`)
gets them cast to fp32 and runs at matmul precision "highest". Implementations:

* "pallas": `vlmgym_kernels` with impl="pallas" (impl="pallas_interpret" off a GPU);
* "xla": `vlmgym_kernels` with impl="xla", the library's default;
* "sdpa_xla", "sdpa_cudnn": `jax.nn.dot_product_attention(implementation=...)`. For
  decode it reads a cache transposed to [B, S, K, H] beforehand (its layout, untimed); for
  the vision windows it gathers the patches into padded windows and back inside the timed
  function, masking the padding with sequence lengths. cuDNN rejects some of these
  shapes: its error is recorded, not raised.

FLOPs count the useful products only (causal half, valid keys, pairs inside a window).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import vlmgym_kernels
from device import error_text, median_seconds

# bf16 kernels against their fp32 reference: the table of tests/conftest.py (TOLERANCES
# ["bfloat16"], which holds for O(1) values; not importable, it is a pytest conftest). At
# these shapes some gradients reach magnitudes of several units, so an output passes when
# max |got - want| <= BF16_TOLERANCE * max(1, max |want|).
BF16_TOLERANCE = 2e-2


@dataclasses.dataclass(frozen=True)
class KernelShapes:
    """Dimension letters as in STYLE.md."""

    prefill: tuple[int, int, int, int, int]  # B, T, N, K, H (S == T, causal)
    decode: tuple[int, int, int, int, int]  # B, S, N, K, H
    vision: tuple[int, int, int, int]  # image side in pixels, N, H, patches per window


SHAPES = {
    "gpu": KernelShapes(prefill=(1, 4096, 28, 4, 128), decode=(64, 4096, 28, 4, 128),
                        vision=(1024, 16, 80, 64)),
    "smoke": KernelShapes(prefill=(1, 256, 4, 2, 64), decode=(4, 256, 4, 2, 64),
                          vision=(224, 2, 80, 64)),
}  # fmt: skip


@dataclasses.dataclass
class Case:
    """One kernel: its reference (on fp32 inputs) and the implementations to measure.

    impls: name -> (function, its bf16 arguments), or name -> str (why it is skipped).
    """

    shape: dict[str, int]
    flops: float
    reference: Callable[..., Any]
    reference_args: tuple[Any, ...]
    impls: dict[str, tuple[Callable[..., Any], tuple[Any, ...]] | str]


def _normal(seed: int, shape: tuple[int, ...], dtype: Any = jnp.bfloat16) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32).astype(dtype)


def _fp32(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Floating arguments as fp32 (the same bf16-rounded values), the rest unchanged."""
    return tuple(
        a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a for a in args
    )


def _pallas_impl() -> str:
    return "pallas" if jax.default_backend() == "gpu" else "pallas_interpret"


def _sdpa_impls(make: Callable[[str], Any], args: tuple[Any, ...]) -> dict[str, Any]:
    """The two `jax.nn.dot_product_attention` baselines; cuDNN only where there is a GPU."""
    out: dict[str, Any] = {"sdpa_xla": (make("xla"), args)}
    if jax.default_backend() == "gpu":
        out["sdpa_cudnn"] = (make("cudnn"), args)
    else:
        out["sdpa_cudnn"] = f"cuDNN needs an NVIDIA GPU (backend is {jax.default_backend()})"
    return out


def flash_forward_case(shapes: KernelShapes) -> Case:
    B, T, N, K, H = shapes.prefill
    q, k, v = _normal(0, (B, T, N, H)), _normal(1, (B, T, K, H)), _normal(2, (B, T, K, H))
    seg = jnp.ones((B, T), jnp.int32)  # [B, T]

    def ours(impl: str) -> Callable[..., jax.Array]:
        def fn(q, k, v, seg):
            return vlmgym_kernels.attention(q, k, v, seg, seg, causal=True, impl=impl)

        return fn

    def sdpa(implementation: str) -> Callable[..., jax.Array]:
        def fn(q, k, v, seg):
            del seg
            return jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation=implementation
            )

        return fn

    args = (q, k, v, seg)
    return Case(
        shape=dict(B=B, T=T, S=T, N=N, K=K, H=H),
        flops=2.0 * B * N * T * T * H,  # causal: half of 4 * B * N * T * S * H
        reference=ours("reference"),
        reference_args=_fp32(args),
        impls={"pallas": (ours(_pallas_impl()), args), "xla": (ours("xla"), args),
               **_sdpa_impls(sdpa, args)},
    )  # fmt: skip


def _with_grad(forward: Callable[..., jax.Array]) -> Callable[..., Any]:
    """fn(q, k, v, seg, ct) -> (dq, dk, dv) of sum(forward(q, k, v, seg) * ct)."""

    def fn(q, k, v, seg, ct):
        def loss(q, k, v):
            return jnp.sum(forward(q, k, v, seg).astype(jnp.float32) * ct)

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    return fn


def flash_backward_case(shapes: KernelShapes) -> Case:
    forward = flash_forward_case(shapes)
    B, T, N, _, H = shapes.prefill
    ct = _normal(3, (B, T, N, H), jnp.float32)  # cotangent [B, T, N, H]
    impls: dict[str, Any] = {}
    for name, impl in forward.impls.items():
        impls[name] = impl if isinstance(impl, str) else (_with_grad(impl[0]), (*impl[1], ct))
    return Case(
        shape=forward.shape,
        flops=3.5 * forward.flops,  # forward (2 matmuls) + backward (5 matmuls)
        reference=_with_grad(forward.reference),
        reference_args=(*forward.reference_args, ct),
        impls=impls,
    )


def decode_case(shapes: KernelShapes) -> Case:
    B, S, N, K, H = shapes.decode
    q, k, v = _normal(0, (B, N, H)), _normal(1, (B, K, S, H)), _normal(2, (B, K, S, H))
    lengths = jnp.asarray(np.random.default_rng(0).integers(S // 2, S + 1, B), jnp.int32)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, S, K, H]

    def ours(impl: str) -> Callable[..., jax.Array]:
        def fn(q, k, v, lengths):
            return vlmgym_kernels.decode_attention(q, k, v, lengths, impl=impl)

        return fn

    def sdpa(implementation: str) -> Callable[..., jax.Array]:
        def fn(q, kt, vt, lengths):
            out = jax.nn.dot_product_attention(
                q[:, None], kt, vt, key_value_seq_lengths=lengths, implementation=implementation
            )  # [B, 1, N, H]
            return out[:, 0]

        return fn

    args = (q, k, v, lengths)
    return Case(
        shape=dict(B=B, S=S, N=N, K=K, H=H),
        flops=4.0 * N * H * float(lengths.sum()),
        reference=ours("reference"),
        reference_args=_fp32(args),
        impls={"pallas": (ours(_pallas_impl()), args), "xla": (ours("xla"), args),
               **_sdpa_impls(sdpa, (q, kt, vt, lengths))},
    )  # fmt: skip


def vision_windows(side: int, window: int) -> np.ndarray:
    """Window segment ids int32[P] of one side x side image (14 px patches, 2 x 2 merge) in
    HF's window order: windows of `window` patches, cut short at the image's edges."""
    units = -(-side // 28)  # merge units per side (the processor rounds to multiples of 28)
    per_side = int(np.sqrt(window // 4))  # merge units per window side
    runs = [
        min(per_side, units - r) * min(per_side, units - c) * 4
        for r in range(0, units, per_side)
        for c in range(0, units, per_side)
    ]
    return np.concatenate([np.full(n, i + 1, np.int32) for i, n in enumerate(runs)])


def padded_windows(seg: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The windows as rows of `window` slots: (gather int32[nW, window] patch per slot, 0
    on padding; lengths int32[nW]; back int32[P] slot of each patch in the flat rows)."""
    starts = np.flatnonzero(np.diff(seg, prepend=-1))
    lengths = np.diff(np.append(starts, len(seg))).astype(np.int32)
    slots = np.arange(window)[None, :]
    gather = np.where(slots < lengths[:, None], starts[:, None] + slots, 0).astype(np.int32)
    back = np.concatenate([w * window + np.arange(n) for w, n in enumerate(lengths)])
    return gather, lengths, back.astype(np.int32)


def vision_case(shapes: KernelShapes) -> Case:
    side, N, H, window = shapes.vision
    seg_np = vision_windows(side, window)
    P = seg_np.shape[0]
    q, k, v = (_normal(i, (P, N, H)) for i in range(3))
    seg = jnp.asarray(seg_np)
    gather, lengths, back = (jnp.asarray(x) for x in padded_windows(seg_np, window))

    def ours(impl: str) -> Callable[..., jax.Array]:
        def fn(q, k, v, seg):
            return vlmgym_kernels.vision_attention(q, k, v, seg, max_segment_len=window, impl=impl)

        return fn

    def sdpa(implementation: str) -> Callable[..., jax.Array]:
        def fn(q, k, v, gather, lengths, back):
            qw, kw, vw = (x[gather] for x in (q, k, v))  # [nW, window, N, H]
            out = jax.nn.dot_product_attention(
                qw, kw, vw, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                implementation=implementation,
            )  # fmt: skip
            return out.reshape(-1, N, H)[back]  # [P, N, H]

        return fn

    args = (q, k, v, seg)
    pairs = float(np.sum(np.bincount(seg_np)[1:] ** 2))
    return Case(
        shape=dict(P=P, N=N, H=H, window=window, windows=int(lengths.shape[0])),
        flops=4.0 * N * H * pairs,
        reference=ours("reference"),
        reference_args=_fp32(args),
        impls={"pallas": (ours(_pallas_impl()), args), "xla": (ours("xla"), args),
               **_sdpa_impls(sdpa, (q, k, v, gather, lengths, back))},
    )  # fmt: skip


CASES: dict[str, Callable[[KernelShapes], Case]] = {
    "flash_forward": flash_forward_case,
    "flash_backward": flash_backward_case,
    "decode": decode_case,
    "vision_windows": vision_case,
}


def compare(got: Any, want: Any) -> dict[str, Any]:
    """Max abs error over the outputs, the reference's largest value, and the verdict."""
    errors, scales = [], []
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        w = np.asarray(w, np.float32)
        errors.append(float(np.max(np.abs(np.asarray(g, np.float32) - w))))
        scales.append(float(np.max(np.abs(w))))
    ok = all(e <= BF16_TOLERANCE * max(1.0, s) for e, s in zip(errors, scales, strict=True))
    return {"max_abs_err": max(errors), "ref_max_abs": max(scales), "ok": ok}


def measure(
    fn: Callable[..., Any], args: tuple[Any, ...], want: Any, flops: float, repeats: int
) -> dict[str, Any]:
    """Compile, check against `want`, time. Any failure becomes {"error": ...}."""
    try:
        compiled = jax.jit(fn).lower(*args).compile()
        result = compare(compiled(*args), want)
        seconds = median_seconds(lambda: compiled(*args), repeats)
    except Exception as err:  # a backend refusing a shape (cuDNN) is a result, not a crash
        return {"error": error_text(err)}
    return {"ms": seconds * 1e3, "tflops": flops / seconds / 1e12, **result}


def run_case(case: Case, repeats: int) -> dict[str, Any]:
    with jax.default_matmul_precision("highest"):
        want = jax.device_get(jax.jit(case.reference)(*case.reference_args))
    impls: dict[str, Any] = {}
    for name, impl in case.impls.items():
        if isinstance(impl, str):
            impls[name] = {"skipped": impl}
        else:
            impls[name] = measure(impl[0], impl[1], want, case.flops, repeats)
    return {"shape": case.shape, "gflop": case.flops / 1e9, "impls": impls}


def kernels_section(smoke: bool, seconds_left: Callable[[], float], repeats: int) -> dict[str, Any]:
    """Every case; a case that cannot start with 30 s left is skipped."""
    shapes = SHAPES["smoke" if smoke else "gpu"]
    out: dict[str, Any] = {"tolerance": BF16_TOLERANCE, "pallas_impl": _pallas_impl()}
    for name, make in CASES.items():
        if seconds_left() < 30:
            out[name] = {"skipped": "time budget spent"}
            continue
        try:
            out[name] = run_case(make(shapes), repeats)
        except Exception as err:  # the reference or the inputs failed: record, go on
            out[name] = {"error": error_text(err)}
    return out
