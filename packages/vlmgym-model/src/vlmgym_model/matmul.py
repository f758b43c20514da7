"""Weight matmuls that take float32 accumulation's fast path in low precision.

`einsum(spec, x, w)` is `jnp.einsum` for a two-operand contraction, with the product
accumulated and emitted in float32 and cast back to the inputs' dtype, forward and
backward alike. In float32 it is exactly `jnp.einsum`.

Why: XLA's CPU backend runs a bf16 x bf16 -> bf16 dot on a slow generic path, while
bf16 x bf16 -> f32 goes to the oneDNN kernel (AMX where the CPU has it). At the Qwen2.5
0.5B MLP shape with 64 rows the difference was 5.8 ms against 0.93 ms per matmul,
cast included. The result is rounded once, from the float32 accumulator, which is what a
bf16 matmul does anyway. The backward pass needs its own rule: JAX's transpose of a dot
with `preferred_element_type=float32` multiplies the float32 cotangent by the bf16
operand, which upcasts both and loses the fast path again; here the cotangent is cast to
the operands' dtype first, as in a plain bf16 matmul's backward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _parse(spec: str) -> tuple[str, str, str]:
    inputs, out = spec.replace(" ", "").split("->")
    x, w = inputs.split(",")
    return x, w, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _low_precision_einsum(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _fwd(spec: str, x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _low_precision_einsum(spec, x, w), (x, w)


def _bwd(
    spec: str, residuals: tuple[jax.Array, jax.Array], ct: jax.Array
) -> tuple[jax.Array, jax.Array]:
    x, w = residuals
    xs, ws, out = _parse(spec)
    ct = ct.astype(x.dtype)
    dx = jnp.einsum(f"{out},{ws}->{xs}", ct, w, preferred_element_type=jnp.float32)
    dw = jnp.einsum(f"{xs},{out}->{ws}", x, ct, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_low_precision_einsum.defvjp(_fwd, _bwd)


def _transposable(spec: str) -> bool:
    """Every index of each operand is in the other operand or the output, none repeated."""
    if spec.count("->") != 1 or spec.count(",") != 1 or "." in spec:
        return False
    x, w, out = _parse(spec)
    if any(len(set(s)) != len(s) for s in (x, w, out)):
        return False
    return set(x) <= set(w) | set(out) and set(w) <= set(x) | set(out)


def einsum(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`jnp.einsum(spec, x, w)` accumulated in float32, returned in x's dtype.

    Args:
      spec: a two-operand einsum spec with an explicit output, e.g. "BTD,DF->BTF"; each
        operand's indices appear in the other operand or the output (a matmul, batched
        or not).
      x, w: operands of the same floating dtype.
    """
    if x.dtype == jnp.float32 or x.dtype != w.dtype or not _transposable(spec):
        return jnp.einsum(spec, x, w)
    return _low_precision_einsum(spec, x, w)
