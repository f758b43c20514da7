"""`vlmgym_model.matmul.einsum`: plain einsum in fp32; f32-accumulated bf16 both ways."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from vlmgym_model.matmul import einsum

SPECS = [
    ("BTD,DF->BTF", (3, 5, 16), (16, 24)),
    ("BNH,NHD->BD", (4, 3, 8), (3, 8, 16)),
    ("BTD,DNH->BTNH", (2, 3, 16), (16, 2, 8)),
]


def _operands(x_shape, w_shape, dtype):
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, x_shape, jnp.float32)
    w = jax.random.normal(kw, w_shape, jnp.float32) / np.sqrt(np.prod(w_shape[:-1]))
    return x.astype(dtype), w.astype(dtype)


def _loss(f, spec):
    # A fixed, non-uniform cotangent: sum of the product with a ramp.
    def loss(x, w):
        y = f(spec, x, w).astype(jnp.float32)
        return jnp.sum(y * jnp.linspace(-1.0, 1.0, y.size).reshape(y.shape))

    return loss


@pytest.mark.parametrize("spec,x_shape,w_shape", SPECS)
def test_float32_matches_jnp_einsum(spec, x_shape, w_shape):
    """The same products as jnp.einsum, forward and backward, up to the summation order."""
    x, w = _operands(x_shape, w_shape, jnp.float32)
    got = [einsum(spec, x, w), *jax.grad(_loss(einsum, spec), argnums=(0, 1))(x, w)]
    want = [jnp.einsum(spec, x, w), *jax.grad(_loss(jnp.einsum, spec), argnums=(0, 1))(x, w)]
    for g, r in zip(got, want, strict=True):
        assert g.dtype == r.dtype and g.shape == r.shape
        scale = float(jnp.max(jnp.abs(r)))
        np.testing.assert_allclose(g / scale, r / scale, atol=1e-6)


def _dots(compiled_hlo: str) -> list[str]:
    return [line for line in compiled_hlo.splitlines() if re.search(r"\sdot\(", line)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_backward_runs_canonical_2d_products(dtype):
    """Every dot of a dense layer's gradient, after XLA's passes, is a 2-D product whose left
    operand contracts its last axis: the form XLA's CPU backend sends to its fast matmul
    kernels. JAX's own transpose rule contracts the batch axes, the left operand's first
    (the float32 counter-check below: what this module ran before it had its own rule)."""
    spec, x_shape, w_shape = SPECS[0]
    x, w = _operands(x_shape, w_shape, dtype)
    hlo = jax.jit(jax.grad(_loss(einsum, spec), argnums=(0, 1))).lower(x, w).compile().as_text()
    dots = _dots(hlo)
    assert len(dots) == 2, hlo  # dx and dw
    for dot in dots:
        assert "lhs_contracting_dims={1}" in dot and re.search(r"\[\d+,\d+\]\{", dot), dot
    if dtype != jnp.float32:
        return
    plain = jax.jit(jax.grad(_loss(jnp.einsum, spec), argnums=(0, 1)))
    plain_dots = _dots(plain.lower(x, w).compile().as_text())
    assert any("lhs_contracting_dims={1}" not in d for d in plain_dots), plain_dots


@pytest.mark.parametrize("spec,x_shape,w_shape", SPECS)
def test_bfloat16_matches_float32_forward_and_backward(spec, x_shape, w_shape, tol):
    x32, w32 = _operands(x_shape, w_shape, jnp.float32)
    x, w = x32.astype(jnp.bfloat16), w32.astype(jnp.bfloat16)
    y = einsum(spec, x, w)
    assert y.dtype == jnp.bfloat16
    # Rounded once from the float32 accumulator.
    want = jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    np.testing.assert_array_equal(y, want)
    # Against the fp32 computation on the fp32 operands: bf16 rounding only.
    ref = jnp.einsum(spec, x32, w32)
    np.testing.assert_allclose(y.astype(jnp.float32), ref, atol=tol["bfloat16"] * 4, rtol=0.05)
    gx, gw = jax.grad(_loss(einsum, spec), argnums=(0, 1))(x, w)
    rx, rw = jax.grad(_loss(jnp.einsum, spec), argnums=(0, 1))(x32, w32)
    assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
    for g, r in ((gx, rx), (gw, rw)):
        scale = float(jnp.max(jnp.abs(r)))
        np.testing.assert_allclose(g.astype(jnp.float32) / scale, r / scale, atol=tol["bfloat16"])


def test_bfloat16_backward_keeps_bfloat16_operands():
    """Every dot in the gradient multiplies bf16 by bf16 (plain JAX would upcast to f32)."""
    spec, x_shape, w_shape = SPECS[0]
    x, w = _operands(x_shape, w_shape, jnp.bfloat16)
    hlo = jax.jit(jax.grad(_loss(einsum, spec), argnums=(0, 1))).lower(x, w).as_text()
    dots = re.findall(r"stablehlo.dot_general[^\n]*", hlo)
    assert len(dots) == 2, hlo  # dx and dw (the forward product itself is unused)
    for dot in dots:
        operand_types = re.search(r":\s*\((tensor<[^)]*)\)\s*->", dot).group(1)
        assert "f32>" not in operand_types and "bf16>" in operand_types, dot
    # The counter-check: JAX's own rule for a float32-accumulated dot upcasts.
    plain = lambda spec, x, w: jnp.einsum(  # noqa: E731
        spec, x, w, preferred_element_type=jnp.float32
    ).astype(x.dtype)
    hlo = jax.jit(jax.grad(_loss(plain, spec), argnums=(0, 1))).lower(x, w).as_text()
    assert any("xf32>, tensor" in d for d in re.findall(r"stablehlo.dot_general[^\n]*", hlo))


def test_other_contractions_fall_back_to_jnp():
    # "ab,b->" sums `a` inside x alone: not a matmul the custom rule can transpose.
    x, w = _operands((4, 8), (8,), jnp.bfloat16)
    np.testing.assert_array_equal(einsum("ab,b->", x, w), jnp.einsum("ab,b->", x, w))
    assert jax.grad(lambda x: einsum("ab,b->", x, w).astype(jnp.float32))(x).shape == (4, 8)
