"""The text decoder (Qwen2 for Qwen2-VL and Qwen2.5-VL, Qwen3 for Qwen3-VL): weights and
pure functions.

What is notable here:
- Qwen2 has q/k/v biases; Qwen3 has none (those weights are None) and normalises each
  head's q and k with an RMSNorm over head_dim before the rotary (`q_norm`, `k_norm`).
- Qwen3-VL's DeepStack adds the vision tower's intermediate features to the hidden states
  at the image tokens after each of the first k layers (`Deepstack`).
- Decoder layers are stacked along a leading `layers` axis and run with `lax.scan`: one
  compiled layer body whatever the depth, and rematerialisation per layer is one flag.
- Attention is GQA with q/k/v biases and no o bias; it goes through `vlmgym_kernels`'
  dispatch, so the implementation is picked by the caller (`impl`).
- Norms, rotary and softmax statistics run in float32 whatever the weight dtype.
- `lm_head` is absent (None) when config.json ties it to the token embedding.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import vlmgym_kernels

from vlmgym_model.lora import reshape_in
from vlmgym_model.matmul import einsum
from vlmgym_model.qwen2_5_vl.config import TextConfig
from vlmgym_model.qwen2_5_vl.rope import apply_rope
from vlmgym_model.weights import ParamSpec


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecoderLayers:
    """All decoder layers, stacked on a leading L axis."""

    input_norm: jax.Array  # [L, D]
    q_proj: jax.Array  # [L, D, N, H]
    q_bias: jax.Array | None  # [L, N, H] (Qwen2)
    k_proj: jax.Array  # [L, D, K, H]
    k_bias: jax.Array | None  # [L, K, H] (Qwen2)
    v_proj: jax.Array  # [L, D, K, H]
    v_bias: jax.Array | None  # [L, K, H] (Qwen2)
    o_proj: jax.Array  # [L, N, H, D]
    post_norm: jax.Array  # [L, D]
    gate_proj: jax.Array  # [L, D, F]
    up_proj: jax.Array  # [L, D, F]
    down_proj: jax.Array  # [L, F, D]
    q_norm: jax.Array | None = None  # [L, H] (Qwen3)
    k_norm: jax.Array | None = None  # [L, H] (Qwen3)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TextWeights:
    embed: jax.Array  # [V, D]
    layers: DecoderLayers
    norm: jax.Array  # [D]
    lm_head: jax.Array | None  # [D, V], None when tied to `embed`


def text_param_specs(cfg: TextConfig) -> TextWeights:
    """The shape, logical axes and initialiser of every text weight."""
    L, D, F, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def bias(heads: int, axis: str) -> ParamSpec | None:
        if not cfg.attention_bias:
            return None
        return ParamSpec((L, heads, H), ("layers", axis, "head_dim"), "zeros")

    head_norm = ParamSpec((L, H), ("layers", "norm"), "ones") if cfg.qk_norm else None
    layers = DecoderLayers(
        input_norm=ParamSpec((L, D), ("layers", "norm"), "ones"),
        q_proj=ParamSpec((L, D, N, H), ("layers", "embed", "q_heads", "head_dim")),
        q_bias=bias(N, "q_heads"),
        k_proj=ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
        k_bias=bias(K, "kv_heads"),
        v_proj=ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
        v_bias=bias(K, "kv_heads"),
        q_norm=head_norm,
        k_norm=head_norm,
        o_proj=ParamSpec((L, N, H, D), ("layers", "q_heads", "head_dim", "embed")),
        post_norm=ParamSpec((L, D), ("layers", "norm"), "ones"),
        gate_proj=ParamSpec((L, D, F), ("layers", "embed", "mlp")),
        up_proj=ParamSpec((L, D, F), ("layers", "embed", "mlp")),
        down_proj=ParamSpec((L, F, D), ("layers", "mlp", "embed")),
    )
    return TextWeights(
        embed=ParamSpec((V, D), ("vocab", "embed")),
        layers=layers,
        norm=ParamSpec((D,), ("norm",), "ones"),
        lm_head=None if cfg.tie_word_embeddings else ParamSpec((D, V), ("embed", "vocab")),
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Deepstack:
    """Qwen3-VL's DeepStack: after decoder layer i < k, features[i] is added to the hidden
    states at the image tokens (rows, cols)."""

    rows: jax.Array  # int32[K]
    cols: jax.Array  # int32[K]
    features: jax.Array  # [k, K, D]


def add_deepstack(x: jax.Array, deepstack: Deepstack | None, layer: jax.Array) -> jax.Array:
    """x [B, T, D] after decoder layer `layer` (a traced index), with its DeepStack features
    added (nothing after layer k - 1 or without DeepStack)."""
    if deepstack is None:
        return x
    k = deepstack.features.shape[0]
    features = deepstack.features[jnp.minimum(layer, k - 1)]  # [K, D]
    features = jnp.where(layer < k, features, jnp.zeros_like(features)).astype(x.dtype)
    return x.at[deepstack.rows, deepstack.cols].add(features, mode="drop")


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, returned in x's dtype (HF's Qwen2RMSNorm)."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return weight * x.astype(dtype)


def embed_tokens(weights: TextWeights, input_ids: jax.Array) -> jax.Array:
    """int[B, T] -> [B, T, D] in the embedding's dtype."""
    return jnp.take(weights.embed, input_ids, axis=0)  # [B, T, D]


def add_bias(x: jax.Array, bias: jax.Array | None) -> jax.Array:
    return x if bias is None else x + bias


def head_norm(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
    """Qwen3's per-head RMSNorm of q or k over head_dim (identity without the weight)."""
    return x if weight is None else rms_norm(x, weight, eps)


def attention_qkv(
    layer: DecoderLayers, h: jax.Array, cos: jax.Array, sin: jax.Array, eps: float = 1e-6
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Projections (q/k norms) plus rotary: h [B, T, D] -> q [B, T, N, H], k, v [B, T, K, H]."""
    q = add_bias(einsum("BTD,DNH->BTNH", h, layer.q_proj), layer.q_bias)  # [B, T, N, H]
    k = add_bias(einsum("BTD,DKH->BTKH", h, layer.k_proj), layer.k_bias)  # [B, T, K, H]
    v = add_bias(einsum("BTD,DKH->BTKH", h, layer.v_proj), layer.v_bias)  # [B, T, K, H]
    q, k = head_norm(q, layer.q_norm, eps), head_norm(k, layer.k_norm, eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attention_output(layer: DecoderLayers, attn: jax.Array) -> jax.Array:
    """o_proj: attn [B, T, N, H] -> [B, T, D], as one [N*H, D] matmul.

    The heads are merged first: XLA's CPU dot with two contracting axes ran about 3x slower
    than the same product as a plain matrix multiply at decode shapes.
    """
    B, T, N, H = attn.shape
    w = reshape_in(layer.o_proj, N * H)  # [N*H, D]
    return einsum("BTE,ED->BTD", attn.reshape(B, T, N * H), w)


def mlp(layer: DecoderLayers, h: jax.Array) -> jax.Array:
    """SwiGLU: down(silu(gate(h)) * up(h)). h [B, T, D] -> [B, T, D]."""
    gate = einsum("BTD,DF->BTF", h, layer.gate_proj)  # [B, T, F]
    up = einsum("BTD,DF->BTF", h, layer.up_proj)  # [B, T, F]
    return einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, layer.down_proj)


def decoder_layer(
    layer: DecoderLayers,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    segment_ids: jax.Array,
    cfg: TextConfig,
    impl: str,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """One pre-norm decoder layer over a whole sequence (prefill or training).

    Args:
      layer: one layer's weights (no leading L axis).
      x: [B, T, D] residual stream.
      cos, sin: float32[B, T, H] mRoPE tables.
      segment_ids: int[B, T], 0 on padding.

    Returns:
      The new residual stream [B, T, D] and this layer's (k, v), each [B, T, K, H].
    """
    h = rms_norm(x, layer.input_norm, cfg.rms_norm_eps)
    q, k, v = attention_qkv(layer, h, cos, sin, cfg.rms_norm_eps)
    attn = vlmgym_kernels.attention(
        q, k, v, segment_ids, segment_ids, causal=True, impl=impl
    )  # [B, T, N, H]
    x = x + attention_output(layer, attn)
    x = x + mlp(layer, rms_norm(x, layer.post_norm, cfg.rms_norm_eps))
    return x, (k, v)


def decode_layers(
    weights: TextWeights,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    segment_ids: jax.Array,
    cfg: TextConfig,
    *,
    impl: str = "xla",
    remat: bool = False,
    return_kv: bool = False,
    deepstack: Deepstack | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Run every decoder layer (scan over L) and the final norm.

    Args:
      x: [B, T, D] input embeddings.
      cos, sin: float32[B, T, H]; segment_ids: int[B, T] (0 on padding).
      remat: recompute each layer's activations in the backward pass.
      return_kv: also return the stacked keys and values, each [L, B, T, K, H].
      deepstack: Qwen3-VL's features for the first layers' image tokens, or None.

    Returns:
      Final-normed hidden states [B, T, D], and the KV stack or None.
    """

    def body(carry: jax.Array, scanned: tuple[DecoderLayers, jax.Array]) -> tuple[Any, Any]:
        layer, i = scanned
        out, kv = decoder_layer(layer, carry, cos, sin, segment_ids, cfg, impl)
        return add_deepstack(out, deepstack, i), (kv if return_kv else None)

    if remat:
        body = jax.checkpoint(body, prevent_cse=False)
    layer_index = jnp.arange(cfg.num_hidden_layers)
    x, kv = jax.lax.scan(body, x, (weights.layers, layer_index))
    return rms_norm(x, weights.norm, cfg.rms_norm_eps), kv


def prefixed_decoder_layer(
    layer: DecoderLayers,
    x: tuple[jax.Array, jax.Array],
    rope: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    segment_ids: tuple[jax.Array, jax.Array],
    row_prompt: jax.Array,
    cfg: TextConfig,
    impl: str,
) -> tuple[jax.Array, jax.Array]:
    """One decoder layer over prompts and the completions that continue them.

    The same layer as `decoder_layer` on the rows [prompt(r) | completion r], computed
    without repeating a prompt for each of its completions: prompts attend to themselves
    (causal), and completion r attends to its prompt's keys and values, gathered by
    `row_prompt[r]`, then causally to its own.

    Args:
      x: (prompts [P, T, D], completions [R, N, D]) residual streams.
      rope: (cos, sin) of the prompts [P, T, H], then of the completions [R, N, H].
      segment_ids: prompts int[P, T] and completions int[R, N], 0 on padding; a completion
        token attends to prompt tokens of the same (non-zero) id.
      row_prompt: int[R], the prompt each completion continues.

    Returns:
      The new (prompts, completions) residual streams.
    """
    xp, xc = x
    cos_p, sin_p, cos_c, sin_c = rope
    seg_p, seg_c = segment_ids
    eps = cfg.rms_norm_eps
    qp, kp, vp = attention_qkv(layer, rms_norm(xp, layer.input_norm, eps), cos_p, sin_p, eps)
    qc, kc, vc = attention_qkv(layer, rms_norm(xc, layer.input_norm, eps), cos_c, sin_c, eps)
    attn_p = vlmgym_kernels.attention(qp, kp, vp, seg_p, seg_p, causal=True, impl=impl)
    k_all = jnp.concatenate([kp[row_prompt], kc], axis=1)  # [R, T + N, K, H]
    v_all = jnp.concatenate([vp[row_prompt], vc], axis=1)  # [R, T + N, K, H]
    seg_all = jnp.concatenate([seg_p[row_prompt], seg_c], axis=1)  # [R, T + N]
    attn_c = vlmgym_kernels.attention(
        qc, k_all, v_all, seg_c, seg_all, causal=True, impl=impl
    )  # [R, N, N_heads, H]: query i sees the prompt and completion keys 0..i
    xp = xp + attention_output(layer, attn_p)
    xc = xc + attention_output(layer, attn_c)
    xp = xp + mlp(layer, rms_norm(xp, layer.post_norm, cfg.rms_norm_eps))
    xc = xc + mlp(layer, rms_norm(xc, layer.post_norm, cfg.rms_norm_eps))
    return xp, xc


def decode_prefixed_layers(
    weights: TextWeights,
    x: tuple[jax.Array, jax.Array],
    rope: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    segment_ids: tuple[jax.Array, jax.Array],
    row_prompt: jax.Array,
    cfg: TextConfig,
    *,
    impl: str = "xla",
    remat: bool = False,
    deepstack: Deepstack | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`decode_layers` for prompts shared by several completions (see
    `prefixed_decoder_layer` for the arguments; `deepstack` is on the prompts' image
    tokens): final-normed hidden states of the prompts [P, T, D] and of the completions
    [R, N, D].

    A group of n samples of one prompt costs T + n * N tokens of work instead of
    n * (T + N); the results equal `decode_layers` on the concatenated rows.
    """

    def body(carry: tuple[jax.Array, jax.Array], scanned: Any) -> tuple[Any, None]:
        layer, i = scanned
        xp, xc = prefixed_decoder_layer(layer, carry, rope, segment_ids, row_prompt, cfg, impl)
        return (add_deepstack(xp, deepstack, i), xc), None

    if remat:
        body = jax.checkpoint(body, prevent_cse=False)
    layer_index = jnp.arange(cfg.num_hidden_layers)
    (xp, xc), _ = jax.lax.scan(body, x, (weights.layers, layer_index))
    eps = cfg.rms_norm_eps
    return rms_norm(xp, weights.norm, eps), rms_norm(xc, weights.norm, eps)


def output_projection(weights: TextWeights) -> jax.Array:
    """The [D, V] matrix that maps hidden states to logits (tied or not)."""
    return weights.embed.T if weights.lm_head is None else weights.lm_head


def logits_from_hidden(weights: TextWeights, hidden: jax.Array) -> jax.Array:
    """[B, T, D] -> float32[B, T, V]."""
    return jnp.einsum(
        "BTD,DV->BTV", hidden, output_projection(weights), preferred_element_type=jnp.float32
    )


def next_token_logits(weights: TextWeights, hidden: jax.Array) -> jax.Array:
    """[B, D] -> float32[B, V]: one position per row, as a plain 2-D matmul.

    A tied projection is read as the [V, D] embedding itself (no transpose): on CPU this
    ran 0.045 s against 0.062 s for `logits_from_hidden` on one position, at 64 rows x 152k
    in bf16.
    """
    if weights.lm_head is None:
        return jnp.einsum("BD,VD->BV", hidden, weights.embed, preferred_element_type=jnp.float32)
    return jnp.einsum("BD,DV->BV", hidden, weights.lm_head, preferred_element_type=jnp.float32)
