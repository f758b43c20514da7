"""Shared-prompt decoding (`decode_prefixed_layers`) equals `decode_layers` on whole rows.

Training runs each prompt once for all its samples; the hidden states and the gradients
must be those of the rows [prompt | completion] run one by one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from vlmgym_model.qwen2_5_vl import text
from vlmgym_model.qwen2_5_vl.config import TextConfig
from vlmgym_model.qwen2_5_vl.rope import mrope_cos_sin
from vlmgym_model.weights import init_params

CFG = TextConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    mrope_section=(2, 1, 1),
)
P, T, N = 2, 7, 5
ROW_PROMPT = np.array([0, 0, 1, 0, 1], np.int32)  # 5 completions of 2 prompts
PROMPT_PAD = np.array([2, 0])  # left padding of each prompt
COMPLETION_LEN = np.array([5, 3, 1, 4, 5])  # right padding of each completion


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    prompt_ids = rng.integers(0, CFG.vocab_size, (P, T)).astype(np.int32)
    prompt_seg = (np.arange(T)[None] >= PROMPT_PAD[:, None]).astype(np.int32)  # [P, T]
    # mRoPE positions: 3 distinct axes, as an image's would be; padding at 0.
    prompt_pos = np.stack([np.cumsum(prompt_seg, 1) - 1 + a * prompt_seg for a in range(3)])
    prompt_pos = np.where(prompt_seg[None] > 0, prompt_pos, 0).astype(np.int32)  # [3, P, T]
    R = len(ROW_PROMPT)
    targets = rng.integers(0, CFG.vocab_size, (R, N)).astype(np.int32)
    seg = (np.arange(N)[None] < COMPLETION_LEN[:, None]).astype(np.int32)  # [R, N]
    start = prompt_pos[:, ROW_PROMPT, -1].max(0) + 1  # [R]
    pos = np.broadcast_to(start[None, :, None] + np.arange(N), (3, R, N)).astype(np.int32)
    return dict(
        prompt_ids=prompt_ids,
        prompt_seg=prompt_seg,
        prompt_pos=prompt_pos,
        targets=targets,
        seg=seg,
        pos=pos,
    )


def _prefixed(weights, d, impl):
    xp = text.embed_tokens(weights, d["prompt_ids"])
    xc = text.embed_tokens(weights, d["targets"])
    rope = (*mrope_cos_sin(d["prompt_pos"], CFG), *mrope_cos_sin(d["pos"], CFG))
    return text.decode_prefixed_layers(
        weights,
        (xp, xc),
        rope,
        (d["prompt_seg"], d["seg"]),
        jnp.asarray(ROW_PROMPT),
        CFG,
        impl=impl,
        remat=True,
    )


def _whole_rows(weights, d, impl):
    ids = jnp.concatenate([d["prompt_ids"][ROW_PROMPT], d["targets"]], axis=1)  # [R, T + N]
    seg = jnp.concatenate([d["prompt_seg"][ROW_PROMPT], d["seg"]], axis=1)
    pos = jnp.concatenate([d["prompt_pos"][:, ROW_PROMPT], d["pos"]], axis=2)
    cos, sin = mrope_cos_sin(pos, CFG)
    hidden, _ = text.decode_layers(
        weights, text.embed_tokens(weights, ids), cos, sin, seg, CFG, impl=impl
    )
    return hidden[:, :T], hidden[:, T:]


@functools.partial(jax.jit, static_argnums=(0, 3))
def _value_and_grads(fn, weights, d, impl):
    """Hidden states on real tokens and the gradient of a fixed random functional of them
    (scaled so that the gradients are O(1), where fp32 rounding stays far below 1e-4)."""
    valid_p = d["prompt_seg"][ROW_PROMPT][..., None]  # [R, T, 1]
    valid_c = d["seg"][..., None]  # [R, N, 1]
    probe_p = 0.01 * jax.random.normal(jax.random.key(1), (len(ROW_PROMPT), T, CFG.hidden_size))
    probe_c = 0.01 * jax.random.normal(jax.random.key(2), (len(ROW_PROMPT), N, CFG.hidden_size))

    def objective(w):
        hp, hc = fn(w, d, impl)
        if hp.shape[0] == P:  # prefixed: one prompt row per prompt
            hp = hp[ROW_PROMPT]
        hp, hc = hp * valid_p, hc * valid_c
        return jnp.sum(hp * probe_p) + jnp.sum(hc * probe_c), (hp, hc)

    return jax.value_and_grad(objective, has_aux=True)(weights)


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_prefixed_layers_equal_whole_rows(impl: str, tol: dict[str, float]) -> None:
    weights = init_params(text.text_param_specs(CFG), jax.random.key(0), jnp.float32, 0.3)
    d = {k: jnp.asarray(v) for k, v in _inputs().items()}
    with jax.default_matmul_precision("highest"):
        (_, (hp, hc)), grads = _value_and_grads(_prefixed, weights, d, impl)
        (_, (wp, wc)), want_grads = _value_and_grads(_whole_rows, weights, d, impl)
    assert float(jnp.abs(wc).max()) > 0.1  # the completions see something
    np.testing.assert_allclose(hp, wp, atol=tol["float32"], rtol=0)
    np.testing.assert_allclose(hc, wc, atol=tol["float32"], rtol=0)
    flat, _ = jax.tree_util.tree_flatten_with_path(grads)
    want = jax.tree.leaves(want_grads)
    for (path, g), w in zip(flat, want, strict=True):
        if "lm_head" not in jax.tree_util.keystr(path):  # unused by hidden states
            assert float(jnp.abs(w).max()) > 1e-3, jax.tree_util.keystr(path)
        np.testing.assert_allclose(
            g, w, atol=tol["float32"], rtol=0, err_msg=jax.tree_util.keystr(path)
        )


def test_prefixed_completion_ignores_other_prompts() -> None:
    """Changing prompt 1 changes no completion of prompt 0 (and changes those of prompt 1)."""
    weights = init_params(text.text_param_specs(CFG), jax.random.key(0), jnp.float32, 0.3)
    d = {k: jnp.asarray(v) for k, v in _inputs().items()}
    _, hc = jax.jit(_prefixed, static_argnums=2)(weights, d, "xla")
    d["prompt_ids"] = d["prompt_ids"].at[1].set((d["prompt_ids"][1] + 1) % CFG.vocab_size)
    _, hc2 = jax.jit(_prefixed, static_argnums=2)(weights, d, "xla")
    of0, of1 = ROW_PROMPT == 0, ROW_PROMPT == 1
    assert np.array_equal(np.asarray(hc)[of0], np.asarray(hc2)[of0])
    assert not np.allclose(np.asarray(hc)[of1], np.asarray(hc2)[of1])
