"""Log-probs of sampled completions under a model's params: the forward pass training runs.

- Each prompt runs once for all its samples: a GRPO group of n completions of N tokens
  after a T-token prompt costs T + n * N tokens of forward and backward work, not
  n * (T + N) (`CompletionInputs` holds each distinct prompt once and `row_prompt` says
  which one a completion continues; the decoder's `decode_prefixed_layers` attends each
  completion to its prompt's keys). With a 300-token image prompt, 8 samples and 64 new
  tokens that is 3.6x less work than one row per sample.
- The full logits `[R, N, V]` (V = 151,936 for Qwen) are never held at once: hidden states
  are projected to the vocabulary in chunks of tokens, each chunk rematerialised in the
  backward pass, so only `[chunk, V]` float32 logits exist at any moment.

The prompts go through `embed` (vision tower + image features over their placeholders),
as in sampling's prefill and in `forward`; building `CompletionInputs` from rollouts is
the trainer's job (`vlmgym_train.batch`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from vlmgym_model.matmul import einsum
from vlmgym_model.qwen2_5_vl import text
from vlmgym_model.qwen2_5_vl.config import Qwen2_5_VLConfig
from vlmgym_model.qwen2_5_vl.model import (
    FeaturePlacement,
    ImageFeatures,
    ModelInputs,
    Qwen2_5_VLWeights,
    embed,
)
from vlmgym_model.qwen2_5_vl.rope import mrope_cos_sin


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class CompletionInputs:
    """R completions of N tokens that continue P prompts of T tokens.

    Completions of the same prompt (a GRPO group) share one prompt row: the prompt's
    tokens are run through the model once, not once per sample.
    """

    prompts: ModelInputs  # [P, T], left-padded, with the prompts' images
    targets: jax.Array  # int32[R, N]: the completion tokens (also the completions' inputs)
    segment_ids: jax.Array  # int32[R, N]: 1 on the completion's tokens, 0 on padding
    positions: jax.Array  # int32[3, R, N]
    row_prompt: jax.Array  # int32[R]: the prompt row each completion continues


@dataclasses.dataclass(frozen=True)
class CompletionStatics:
    """How the log-prob pass runs (compile-time constants)."""

    impl: str = "xla"
    remat: bool = False
    train_vision: bool = True
    logprob_chunk: int = 1024


@jax.custom_vjp
def _logp_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32[C, V] logits, int[C] targets -> (log p(target), entropy), float32[C] each.

    The backward rule writes d/dlogits in one elementwise pass,
    g_logp * (onehot - p) + g_entropy * p * (E_p[logits] - logits), where autodiff would
    scatter the target's cotangent into a zeroed [C, V] array first.
    """
    logp, entropy, _ = _logp_entropy_stats(logits, targets)
    return logp, entropy


def _logp_entropy_stats(
    logits: jax.Array, targets: jax.Array
) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
    lse = jax.nn.logsumexp(logits, axis=-1)  # [C]
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    probs = jnp.exp(logits - lse[:, None])
    mean_logit = jnp.sum(probs * logits, axis=-1)  # E_p[logits]
    return target_logit - lse, lse - mean_logit, (lse, mean_logit)


def _logp_entropy_fwd(
    logits: jax.Array, targets: jax.Array
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, ...]]:
    logp, entropy, (lse, mean_logit) = _logp_entropy_stats(logits, targets)
    return (logp, entropy), (logits, targets, lse, mean_logit)


def _logp_entropy_bwd(
    residuals: tuple[jax.Array, ...], cts: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, None]:
    logits, targets, lse, mean_logit = residuals
    g_logp, g_entropy = cts
    probs = jnp.exp(logits - lse[:, None])
    onehot = jnp.arange(logits.shape[-1])[None, :] == targets[:, None]
    d_logits = g_logp[:, None] * (onehot - probs) + g_entropy[:, None] * probs * (
        mean_logit[:, None] - logits
    )
    return d_logits, None


_logp_entropy.defvjp(_logp_entropy_fwd, _logp_entropy_bwd)


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
        logits = einsum("CD,DV->CV", h_c, out_proj, preferred_element_type=jnp.float32)
        return _logp_entropy(logits, t_c)

    logp, entropy = jax.lax.map(one, (h, t))
    logp = logp.reshape(-1)[:total].reshape(R, N)
    entropy = entropy.reshape(-1)[:total].reshape(R, N)
    return logp, entropy


def completion_logprobs(
    params: Qwen2_5_VLWeights,
    config: Qwen2_5_VLConfig,
    batch: CompletionInputs,
    statics: CompletionStatics,
    features: tuple[ImageFeatures, FeaturePlacement] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per-token log-probs and entropies of the completions: float32[R, N] each.

    features: the vision tower's output for the prompts' images and where it goes, when it
    has run already (micro-batches share one run per step; `params.vision` is then unused).
    """
    prompts = batch.prompts
    xp, deepstack = embed(
        params,
        config,
        prompts,
        impl=statics.impl,
        remat=statics.remat,
        train_vision=statics.train_vision,
        features=None if features is None else features[0],
        placement=None if features is None else features[1],
    )  # [P, T, D]
    xc = text.embed_tokens(params.text, batch.targets)  # [R, N, D]
    rope = (
        *mrope_cos_sin(prompts.positions, config.text),
        *mrope_cos_sin(batch.positions, config.text),
    )
    hp, hc = text.decode_prefixed_layers(
        params.text,
        (xp, xc),
        rope,
        (prompts.segment_ids, batch.segment_ids),
        batch.row_prompt,
        config.text,
        impl=statics.impl,
        remat=statics.remat,
        deepstack=deepstack,
    )  # [P, T, D], [R, N, D]
    # Position i predicts token i + 1: the prompt's last position predicts the first target.
    h = jnp.concatenate([hp[batch.row_prompt, -1:], hc[:, :-1]], axis=1)  # [R, N, D]
    return token_logprobs(
        h, text.output_projection(params.text), batch.targets, statics.logprob_chunk
    )


@functools.partial(jax.jit, static_argnames=("config", "statics"))
def compute_logprobs(
    params: Qwen2_5_VLWeights,
    batch: CompletionInputs,
    *,
    config: Qwen2_5_VLConfig,
    statics: CompletionStatics,
) -> tuple[jax.Array, jax.Array]:
    """`completion_logprobs` jitted, without gradients (reference-policy log-probs)."""
    return completion_logprobs(params, config, batch, statics)
