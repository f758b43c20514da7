"""`vlmgym_model.token_logprobs`: chunked log-probs and entropies, and their hand-written backward
rule, against a direct log-softmax over the full logits and JAX's autodiff of it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from vlmgym_model import token_logprobs

R, N, D, V = 3, 5, 16, 40


def _inputs(dtype):
    kh, kw, kt = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(kh, (R, N, D), jnp.float32)
    # Large logits (|z| up to ~30): the softmax is far from uniform, as on real weights.
    out_proj = 2.0 * jax.random.normal(kw, (D, V), jnp.float32)
    targets = jax.random.randint(kt, (R, N), 0, V)
    return hidden.astype(dtype), out_proj.astype(dtype), targets


def _direct(hidden, out_proj, targets):
    logits = jnp.einsum("RND,DV->RNV", hidden, out_proj, preferred_element_type=jnp.float32)
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy


def _objective(fn, targets):
    # Non-uniform weights on both outputs: the entropy's backward rule is exercised too.
    a = jnp.linspace(-1.0, 2.0, R * N).reshape(R, N)
    b = jnp.linspace(0.5, -0.7, R * N).reshape(R, N)

    def f(hidden, out_proj):
        logp, entropy = fn(hidden, out_proj, targets)
        return jnp.sum(a * logp) + jnp.sum(b * entropy)

    return f


@pytest.mark.parametrize("chunk", [4, 7, 1024])
def test_values_and_gradients_match_autodiff(chunk):
    hidden, out_proj, targets = _inputs(jnp.float32)
    got = token_logprobs(hidden, out_proj, targets, chunk)
    want = _direct(hidden, out_proj, targets)
    for g, w in zip(got, want, strict=True):
        # lse - E[logits] cancels at |logits| ~ 30: fp32 rounding of the logits, ~1e-4.
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)

    chunked = _objective(lambda h, w, t: token_logprobs(h, w, t, chunk), targets)
    g_hidden, g_proj = jax.grad(chunked, argnums=(0, 1))(hidden, out_proj)
    r_hidden, r_proj = jax.grad(_objective(_direct, targets), argnums=(0, 1))(hidden, out_proj)
    for g, r in ((g_hidden, r_hidden), (g_proj, r_proj)):
        scale = float(jnp.max(jnp.abs(r)))
        np.testing.assert_allclose(g / scale, r / scale, atol=1e-5)


def test_bfloat16_operands_give_float32_logprobs_and_bfloat16_gradients():
    hidden, out_proj, targets = _inputs(jnp.bfloat16)
    logp, entropy = token_logprobs(hidden, out_proj, targets, 8)
    assert logp.dtype == jnp.float32 and entropy.dtype == jnp.float32
    want = _direct(hidden, out_proj, targets)
    np.testing.assert_allclose(logp, want[0], atol=1e-4, rtol=1e-4)
    grads = jax.grad(
        _objective(lambda h, w, t: token_logprobs(h, w, t, 8), targets), argnums=(0, 1)
    )(hidden, out_proj)
    assert all(g.dtype == jnp.bfloat16 and bool(jnp.isfinite(g).all()) for g in grads)
