"""Policy log-probs of sampled completions, recomputed under the current params.

The full logits `[R, N, V]` (V = 151,936 for Qwen) are never held at once: hidden states
are projected to the vocabulary in chunks of tokens, each chunk rematerialised in the
backward pass, so only `[chunk, V]` float32 logits exist at any moment.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from vlmgym_model.qwen2_5_vl import text
from vlmgym_model.qwen2_5_vl.config import Qwen2_5_VLConfig
from vlmgym_model.qwen2_5_vl.model import Qwen2_5_VLWeights, embed_inputs
from vlmgym_model.qwen2_5_vl.rope import mrope_cos_sin
from vlmgym_model.qwen2_5_vl.vision import vision_tower


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PolicyInputs:
    """Device arrays for a batch of R rows of S = T + N tokens (see `RolloutBatch`)."""

    input_ids: jax.Array  # int32[R, S]
    segment_ids: jax.Array  # int32[R, S]
    positions: jax.Array  # int32[3, R, S]
    targets: jax.Array  # int32[R, N]
    image_rows: jax.Array  # int32[K]
    image_cols: jax.Array  # int32[K]
    image_feature_index: jax.Array  # int32[K]
    pixel_values: jax.Array | None  # float32[P, 1176]
    layout: dict[str, jax.Array] | None  # the vision layout's index arrays


@dataclasses.dataclass(frozen=True)
class PolicyStatics:
    """The static (compile-time) side of a batch and of the computation."""

    prompt_len: int
    max_window_len: int = 0
    max_image_len: int = 0
    impl: str = "xla"
    remat: bool = False
    train_vision: bool = True
    logprob_chunk: int = 1024


def token_logprobs(
    hidden: jax.Array, out_proj: jax.Array, targets: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """Log-probs of `targets` and the entropy of each next-token distribution, chunked.

    Args:
      hidden: [R, N, D] final hidden states predicting each target.
      out_proj: [D, V] the output projection.
      targets: int32[R, N].
      chunk: tokens per chunk of logits.

    Returns:
      float32[R, N] log p(target) and float32[R, N] entropy.
    """
    R, N, D = hidden.shape
    total = R * N
    chunk = max(1, min(chunk, total))
    n_chunks = -(-total // chunk)
    pad = n_chunks * chunk - total
    h = jnp.pad(hidden.reshape(total, D), ((0, pad), (0, 0))).reshape(n_chunks, chunk, D)
    t = jnp.pad(targets.reshape(total), (0, pad)).reshape(n_chunks, chunk)

    @jax.checkpoint
    def one(args: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        h_c, t_c = args
        logits = jnp.einsum("CD,DV->CV", h_c, out_proj, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)  # [C]
        target_logit = jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]
        probs = jnp.exp(logits - lse[:, None])
        entropy = lse - jnp.sum(probs * logits, axis=-1)
        return target_logit - lse, entropy

    logp, entropy = jax.lax.map(one, (h, t))
    logp = logp.reshape(-1)[:total].reshape(R, N)
    entropy = entropy.reshape(-1)[:total].reshape(R, N)
    return logp, entropy


def policy_logprobs(
    params: Qwen2_5_VLWeights,
    config: Qwen2_5_VLConfig,
    batch: PolicyInputs,
    statics: PolicyStatics,
) -> tuple[jax.Array, jax.Array]:
    """Per-token log-probs and entropies of the completions: float32[R, N] each."""
    vision_params = params.vision
    if not statics.train_vision:
        vision_params = jax.lax.stop_gradient(vision_params)
    features = None
    index = None
    if batch.pixel_values is not None and batch.layout is not None:
        _, merged = vision_tower(
            vision_params,
            batch.pixel_values,
            batch.layout["patch_order"],
            batch.layout["unit_inverse"],
            batch.layout["positions"],
            batch.layout["window_segments"],
            batch.layout["image_segments"],
            cfg=config.vision,
            impl=statics.impl,
            max_window_len=statics.max_window_len,
            max_image_len=statics.max_image_len,
            remat=statics.remat,
        )  # [M, D]
        features = merged[batch.image_feature_index]  # [K, D]
        index = (batch.image_rows, batch.image_cols)
    x = embed_inputs(params.text, batch.input_ids, features, index)  # [R, S, D]
    cos, sin = mrope_cos_sin(batch.positions, config.text)
    hidden, _ = text.decode_layers(
        params.text,
        x,
        cos,
        sin,
        batch.segment_ids,
        config.text,
        impl=statics.impl,
        remat=statics.remat,
    )  # [R, S, D]
    T = statics.prompt_len
    N = batch.targets.shape[1]
    h = hidden[:, T - 1 : T - 1 + N]  # [R, N, D]: position i predicts token i + 1
    return token_logprobs(
        h, text.output_projection(params.text), batch.targets, statics.logprob_chunk
    )


@functools.partial(jax.jit, static_argnames=("config", "statics"))
def compute_logprobs(
    params: Qwen2_5_VLWeights,
    batch: PolicyInputs,
    *,
    config: Qwen2_5_VLConfig,
    statics: PolicyStatics,
) -> tuple[jax.Array, jax.Array]:
    """`policy_logprobs` jitted, without gradients (reference-policy log-probs)."""
    return policy_logprobs(params, config, batch, statics)


def to_policy_inputs(
    batch: Any, layout: dict[str, Any], asarray: Callable[[Any], Any] = jnp.asarray
) -> tuple[PolicyInputs, dict[str, int]]:
    """Arrays from a `RolloutBatch` plus its vision layout; returns static bounds.

    `asarray` makes each leaf: `jnp.asarray` (default device), or `np.asarray` to keep the
    batch on the host (then slice it with `slice_rows` and place it on a mesh).
    """
    arrays = {
        k: asarray(v) for k, v in layout.items() if k not in ("max_window_len", "max_image_len")
    }
    inputs = PolicyInputs(
        input_ids=asarray(batch.input_ids),
        segment_ids=asarray(batch.segment_ids),
        positions=asarray(batch.positions),
        targets=asarray(batch.targets),
        image_rows=asarray(batch.image_rows),
        image_cols=asarray(batch.image_cols),
        image_feature_index=asarray(batch.image_feature_index),
        pixel_values=None if batch.pixel_values is None else asarray(batch.pixel_values),
        layout=arrays or None,
    )
    bounds = {
        "max_window_len": int(layout.get("max_window_len", 0)),
        "max_image_len": int(layout.get("max_image_len", 0)),
    }
    return inputs, bounds


def slice_rows(inputs: PolicyInputs, rows: Any) -> PolicyInputs:
    """The same batch restricted to some rows (images and their scatter indices follow).

    Works on host (numpy) or fully addressable device inputs; the scatter indices come back
    as numpy arrays.
    """
    rows = np.asarray(rows)
    image_rows = np.asarray(inputs.image_rows)
    keep = np.isin(image_rows, rows)
    remap = np.full(int(np.shape(inputs.input_ids)[0]), -1, np.int32)
    remap[rows] = np.arange(len(rows), dtype=np.int32)
    return dataclasses.replace(
        inputs,
        input_ids=inputs.input_ids[rows],
        segment_ids=inputs.segment_ids[rows],
        positions=inputs.positions[:, rows],
        targets=inputs.targets[rows],
        image_rows=remap[image_rows[keep]],
        image_cols=np.asarray(inputs.image_cols)[keep],
        image_feature_index=np.asarray(inputs.image_feature_index)[keep],
    )
