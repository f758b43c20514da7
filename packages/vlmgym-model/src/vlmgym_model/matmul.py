"""Weight matmuls: float32 accumulation in low precision, and a backward pass that runs
on the CPU's fast matmul path.

`einsum(spec, x, w)` is `jnp.einsum` for a two-operand contraction, with the product
accumulated and emitted in float32 and cast back to the inputs' dtype, forward and
backward alike. Its values equal `jnp.einsum`'s up to the summation order.

Dense layers. A spec of the form x[batch..., in...], w[in..., out...] -> [batch..., out...]
(every projection of the model: "BTD,DF->BTF", "BTD,DNH->BTNH") runs as one 2-D product
[M, K] @ [K, N] with its own backward rule:

    dx = ct @ w.T                      (contracts the last axes of both)
    dw = materialise(x.T) @ ct         (a plain [K, M] @ [M, N] product)

Why: XLA's CPU backend sends a dot to its fast kernels (YNNPACK) only when the left
operand contracts its last axis. JAX's own transpose rule writes the weight gradient as a
dot contracting the batch axes, the first of both operands; XLA then either runs a slower
generic dot or, inside the layer scan's backward pass, fuses a transpose of the [M, F]
activation gradient into the preceding elementwise fusion, strided and slow (41 ms a layer
for one [512, 4864] gradient, where the matmul it feeds takes 14 ms). Materialising x.T (the
narrower operand, behind an `optimization_barrier` so that XLA cannot fold the transpose back
into the dot) makes every backward product canonical. On the real 0.5B checkpoint, with the
log-prob rule of `vlmgym_train.policy`, a value-and-grad went from 12.9 to 9.0 s.

Low precision. XLA's CPU backend runs a bf16 x bf16 -> bf16 dot on a slow generic path,
while bf16 x bf16 -> f32 goes to the fast kernel. At the Qwen2.5 0.5B MLP shape with 64
rows the difference was 5.8 ms against 0.93 ms per matmul, cast included. The result is
rounded once, from the float32 accumulator, which is what a bf16 matmul does anyway. In
the backward pass the cotangent is cast to the operands' dtype first, as in a plain bf16
matmul's backward (JAX's transpose of a float32-accumulated dot would multiply the float32
cotangent by the bf16 operand, upcasting both and losing the fast path).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from vlmgym_model.lora import LoraWeight, lora_einsum


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


def _dense_in_axes(spec: str) -> int:
    """How many axes a dense-layer spec contracts (x[batch..., in...], w[in..., out...] ->
    [batch..., out...], in order, no index repeated); 0 when `spec` is not of that form."""
    if spec.count("->") != 1 or spec.count(",") != 1 or "." in spec:
        return 0
    x, w, out = _parse(spec)
    if any(len(set(s)) != len(s) for s in (x, w, out)):
        return 0
    k = len(set(x) & set(w))
    if k == 0 or k == len(w) or x[len(x) - k :] != w[:k] or out != x[: len(x) - k] + w[k:]:
        return 0
    return k


def _dot(x: jax.Array, w: jax.Array, contract: tuple[int, int], dtype: jnp.dtype) -> jax.Array:
    dims = ((contract[0],), (contract[1],)), ((), ())
    y = jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)
    return y.astype(dtype)


@jax.custom_vjp
def _dense_2d(x: jax.Array, w: jax.Array) -> jax.Array:
    """[M, K] @ [K, N] -> float32[M, N], accumulated in float32."""
    return _dot(x, w, (1, 0), jnp.float32)


def _dense_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _dense_2d(x, w), (x, w)


def _dense_bwd(
    residuals: tuple[jax.Array, jax.Array], ct: jax.Array
) -> tuple[jax.Array, jax.Array]:
    x, w = residuals
    ct = ct.astype(x.dtype)
    dx = _dot(ct, w, (1, 1), x.dtype)  # [M, N] x [K, N] -> [M, K]
    x_t = jax.lax.optimization_barrier(x.T)  # [K, M], laid out row-major
    dw = _dot(x_t, ct, (1, 0), w.dtype)  # [K, M] @ [M, N] -> [K, N]
    return dx, dw


_dense_2d.defvjp(_dense_fwd, _dense_bwd)


def einsum(
    spec: str, x: jax.Array, w: jax.Array, *, preferred_element_type: Any = None
) -> jax.Array:
    """`jnp.einsum(spec, x, w)` accumulated in float32, returned in x's dtype.

    Args:
      spec: a two-operand einsum spec with an explicit output, e.g. "BTD,DF->BTF"; each
        operand's indices appear in the other operand or the output (a matmul, batched
        or not).
      x, w: operands of the same floating dtype; `w` may be a `lora.LoraWeight` (a dense
        spec only), which adds its low-rank path.
      preferred_element_type: `jnp.float32` returns the float32 accumulator itself
        (logits from bf16 operands); None returns x's dtype.
    """
    if isinstance(w, LoraWeight):  # a frozen weight with LoRA adapters (vlmgym_model.lora)
        return lora_einsum(spec, x, w, einsum)
    out_dtype = x.dtype if preferred_element_type is None else preferred_element_type
    if x.dtype != w.dtype:
        return jnp.einsum(spec, x, w, preferred_element_type=preferred_element_type)
    k = _dense_in_axes(spec)
    if k:
        batch, out = x.shape[: x.ndim - k], w.shape[k:]
        m, n = math.prod(batch), math.prod(out)
        y = _dense_2d(x.reshape(m, -1), w.reshape(-1, n)).astype(out_dtype)
        return y.reshape(*batch, *out)
    if x.dtype == jnp.float32 or not _transposable(spec):
        return jnp.einsum(spec, x, w, preferred_element_type=preferred_element_type)
    return _low_precision_einsum(spec, x, w).astype(out_dtype)
