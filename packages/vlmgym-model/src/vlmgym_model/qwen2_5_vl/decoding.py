"""Prefill and one-token decode steps over a KV cache, for the sampling engine.

The cache holds every layer's keys and values, `[L, B, S, K, H]`. Prompts are LEFT-padded
to a common length T, so every row's prompt ends at slot T - 1 and decoding writes all
rows at the same slot T + step; row b's valid slots are `starts[b] <= j < T + step + 1`
(`starts` = its count of left padding).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import vlmgym_kernels

from vlmgym_model.qwen2_5_vl import text
from vlmgym_model.qwen2_5_vl.config import Qwen2_5_VLConfig
from vlmgym_model.qwen2_5_vl.rope import mrope_cos_sin
from vlmgym_model.qwen2_5_vl.text import DecoderLayers, TextWeights


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array  # [L, B, S, K, H]
    v: jax.Array  # [L, B, S, K, H]

    @property
    def size(self) -> int:
        return self.k.shape[2]

    def repeat(self, n: int) -> KVCache:
        """Each row repeated n times in a row (a prompt's KV copied to its n samples)."""
        return KVCache(jnp.repeat(self.k, n, axis=1), jnp.repeat(self.v, n, axis=1))


def prefill(
    weights: TextWeights,
    config: Qwen2_5_VLConfig,
    x: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array,
    cache_size: int,
    *,
    impl: str = "xla",
    cache_dtype: jnp.dtype | None = None,
) -> tuple[jax.Array, KVCache]:
    """Run the prompt through the decoder once.

    Args:
      x: [B, T, D] input embeddings (image features already in place), left-padded.
      segment_ids: int[B, T], 1 on tokens, 0 on padding.
      positions: int[3, B, T] mRoPE positions.
      cache_size: S >= T, the cache length (prompt plus the tokens to generate).

    Returns:
      float32[B, V] logits at the last position, and the cache with slots [0, T) filled.
    """
    T = x.shape[1]
    if cache_size < T:
        raise ValueError(f"cache_size={cache_size} is smaller than the prompt length {T}")
    cos, sin = mrope_cos_sin(positions, config.text)  # [B, T, H]
    hidden, kv = text.decode_layers(
        weights, x, cos, sin, segment_ids, config.text, impl=impl, return_kv=True
    )
    assert kv is not None
    k, v = kv  # [L, B, T, K, H]
    dtype = cache_dtype or k.dtype
    pad = [(0, 0), (0, 0), (0, cache_size - T), (0, 0), (0, 0)]
    cache = KVCache(jnp.pad(k.astype(dtype), pad), jnp.pad(v.astype(dtype), pad))
    logits = text.logits_from_hidden(weights, hidden[:, -1:])[:, 0]  # [B, V]
    return logits, cache


def decode_step(
    weights: TextWeights,
    config: Qwen2_5_VLConfig,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache,
    write_index: jax.Array,
    starts: jax.Array,
    *,
    impl: str = "xla",
) -> tuple[jax.Array, KVCache]:
    """One new token per row.

    Args:
      tokens: int[B], the token just sampled for each row.
      positions: int[B], its position id (the same on the t, h and w axes).
      cache: the KV cache; slot `write_index` receives this token's keys and values.
      write_index: int[] scalar, the slot to write (the same for every row).
      starts: int[B], each row's first valid slot.

    Returns:
      float32[B, V] logits for the next token, and the updated cache.
    """
    cfg = config.text
    x = text.embed_tokens(weights, tokens[:, None])  # [B, 1, D]
    pos3 = jnp.broadcast_to(positions[None, :, None], (3, *positions.shape, 1))  # [3, B, 1]
    cos, sin = mrope_cos_sin(pos3, cfg)  # [B, 1, H]
    lengths = jnp.broadcast_to(write_index + 1, starts.shape)

    def body(
        carry: tuple[jax.Array, jax.Array, jax.Array],
        layer_and_index: tuple[DecoderLayers, jax.Array],
    ) -> tuple[tuple[jax.Array, jax.Array, jax.Array], None]:
        x, k_all, v_all = carry
        layer, i = layer_and_index
        h = text.rms_norm(x, layer.input_norm, cfg.rms_norm_eps)
        q, k, v = text.attention_qkv(layer, h, cos, sin)  # [B, 1, N, H], [B, 1, K, H]
        k_all = jax.lax.dynamic_update_slice(
            k_all, k[None].astype(k_all.dtype), (i, 0, write_index, 0, 0)
        )
        v_all = jax.lax.dynamic_update_slice(
            v_all, v[None].astype(v_all.dtype), (i, 0, write_index, 0, 0)
        )
        k_l = jax.lax.dynamic_index_in_dim(k_all, i, keepdims=False)  # [B, S, K, H]
        v_l = jax.lax.dynamic_index_in_dim(v_all, i, keepdims=False)  # [B, S, K, H]
        attn = vlmgym_kernels.decode_attention(
            q[:, 0], k_l.astype(q.dtype), v_l.astype(q.dtype), lengths, starts, impl=impl
        )  # [B, N, H]
        x = x + jnp.einsum("BNH,NHD->BD", attn, layer.o_proj)[:, None]
        x = x + text.mlp(layer, text.rms_norm(x, layer.post_norm, cfg.rms_norm_eps))
        return (x, k_all, v_all), None

    L = cfg.num_hidden_layers
    (x, k_all, v_all), _ = jax.lax.scan(
        body, (x, cache.k, cache.v), (weights.layers, jnp.arange(L))
    )
    hidden = text.rms_norm(x, weights.norm, cfg.rms_norm_eps)
    logits = text.logits_from_hidden(weights, hidden)[:, 0]  # [B, V]
    return logits, KVCache(k_all, v_all)
