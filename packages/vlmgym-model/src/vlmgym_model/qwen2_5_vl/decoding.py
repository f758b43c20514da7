"""Prefill and one-token decode steps over a KV cache, for the sampling engine.

The cache holds one key and one value array per layer, each `[B, K, S, H]` (kv heads
before slots, so decode attention is a plain batched matmul over (B, K) with no transposes).
Prompts are LEFT-padded to a common length T, so every row's prompt ends at slot T - 1
and decoding writes all rows at the same slot T + step; row b's valid slots are
`starts[b] <= j < T + step + 1` (`starts` = its count of left padding).

Decoding runs the layers as an unrolled Python loop over per-layer weights
(`unstack_layers`), not a `scan` over the stacked ones: on CPU a scan slices every layer's
weights and cache out of the stacked arrays (a copy per layer per token); per-layer
buffers avoid those copies. At the 0.5B shape with 64 rows on CPU, a step went from 0.66 s
to 0.59 s, and its attention part alone from 0.13 s to 0.05 s. The price is one copy of the
layer weights per `Sampler` call, held while it decodes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import vlmgym_kernels

from vlmgym_model.matmul import einsum
from vlmgym_model.qwen2_5_vl import text
from vlmgym_model.qwen2_5_vl.config import Qwen2_5_VLConfig
from vlmgym_model.qwen2_5_vl.rope import mrope_cos_sin
from vlmgym_model.qwen2_5_vl.text import DecoderLayers, TextWeights


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # L x [B, K, S, H]
    v: tuple[jax.Array, ...]  # L x [B, K, S, H]

    @property
    def size(self) -> int:
        return self.k[0].shape[2]

    def repeat(self, n: int) -> KVCache:
        """Each row repeated n times in a row (a prompt's KV copied to its n samples)."""
        return KVCache(
            tuple(jnp.repeat(k, n, axis=0) for k in self.k),
            tuple(jnp.repeat(v, n, axis=0) for v in self.v),
        )


def unstack_layers(layers: DecoderLayers) -> tuple[DecoderLayers, ...]:
    """The layer-stacked weights as one pytree per layer (copies, made once per call)."""
    n = jax.tree.leaves(layers)[0].shape[0]
    return tuple(jax.tree.map(lambda w, i=i: w[i], layers) for i in range(n))


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
    pad = [(0, 0), (0, 0), (0, cache_size - T), (0, 0)]

    def per_layer(x: jax.Array) -> tuple[jax.Array, ...]:
        x = jnp.pad(x.astype(dtype).transpose(0, 1, 3, 2, 4), [(0, 0), *pad])  # [L, B, K, S, H]
        return tuple(x[i] for i in range(x.shape[0]))

    cache = KVCache(per_layer(k), per_layer(v))
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
    layers: Sequence[DecoderLayers] | None = None,
    impl: str = "xla",
) -> tuple[jax.Array, KVCache]:
    """One new token per row.

    Args:
      tokens: int[B], the token just sampled for each row.
      positions: int[B], its position id (the same on the t, h and w axes).
      cache: the KV cache; slot `write_index` receives this token's keys and values.
      write_index: int[] scalar, the slot to write (the same for every row).
      starts: int[B], each row's first valid slot.
      layers: `unstack_layers(weights.layers)`, computed once outside a decode loop (by
        default each call slices the stacked weights itself).

    Returns:
      float32[B, V] logits for the next token, and the updated cache.
    """
    cfg = config.text
    if layers is None:
        layers = unstack_layers(weights.layers)
    x = text.embed_tokens(weights, tokens[:, None])  # [B, 1, D]
    pos3 = jnp.broadcast_to(positions[None, :, None], (3, *positions.shape, 1))  # [3, B, 1]
    cos, sin = mrope_cos_sin(pos3, cfg)  # [B, 1, H]
    lengths = jnp.broadcast_to(write_index + 1, starts.shape)
    new_k, new_v = [], []
    for layer, k_cache, v_cache in zip(layers, cache.k, cache.v, strict=True):
        h = text.rms_norm(x, layer.input_norm, cfg.rms_norm_eps)
        q, k, v = text.attention_qkv(layer, h, cos, sin)  # [B, 1, N, H], [B, 1, K, H]
        k_cache = jax.lax.dynamic_update_slice(
            k_cache, k.transpose(0, 2, 1, 3).astype(k_cache.dtype), (0, 0, write_index, 0)
        )
        v_cache = jax.lax.dynamic_update_slice(
            v_cache, v.transpose(0, 2, 1, 3).astype(v_cache.dtype), (0, 0, write_index, 0)
        )
        attn = vlmgym_kernels.decode_attention(
            q[:, 0], k_cache.astype(q.dtype), v_cache.astype(q.dtype), lengths, starts, impl=impl
        )  # [B, N, H]
        x = x + einsum("BNH,NHD->BD", attn, layer.o_proj)[:, None]
        x = x + text.mlp(layer, text.rms_norm(x, layer.post_norm, cfg.rms_norm_eps))
        new_k.append(k_cache)
        new_v.append(v_cache)
    hidden = text.rms_norm(x, weights.norm, cfg.rms_norm_eps)
    logits = text.logits_from_hidden(weights, hidden)[:, 0]  # [B, V]
    return logits, KVCache(tuple(new_k), tuple(new_v))
