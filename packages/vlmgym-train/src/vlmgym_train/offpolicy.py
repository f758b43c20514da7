"""Importance corrections for rollouts sampled by another policy than the one being updated.

Three policies meet in a step's update (all log-probs float32[B, T], untempered):

    pi_behav   what sampled the tokens: the sampler's params, up to K updates old with
               `--max_staleness K`, or the same params run in another dtype or kernel
               (`LossInputs.behaviour_logp`; None: the same as `old_logp`)
    pi_prox    the params at the start of the step's updates (the "proximal" policy): the
               log-probs the trainer recomputes before updating (`LossInputs.old_logp`)
    pi_theta   the params being updated (`LossInputs.logp`)

The clipped ratio pi_theta / pi_prox of the loss keeps each update near pi_prox; the
behaviour ratio rho[b, t] = pi_prox / pi_behav at the sampled token accounts for the tokens
having been drawn from pi_behav. `--is_correction` picks a stop-gradient weight w[b, t]
built from rho and the cap C = `--is_cap` (> 1):

    none        w = 1 (today's objective; nothing is computed)
    token_tis   w[b, t] = min(rho[b, t], C)                       truncated IS, per token
    seq_tis     w[b, t] = min(prod_t' M rho[b, t'], C)            truncated IS, per row
    token_mask  w[b, t] = 1 if 1/C <= rho[b, t] <= C else 0        tokens far off dropped

`seq_tis` uses the product over the row's masked tokens, i.e. the sequence's likelihood
ratio pi_prox(y|x) / pi_behav(y|x) (verl's sequence-level rollout IS), not the geometric
mean of `gspo`'s length-normalised ratio; it is unbiased for the sequence before truncation
and its truncation bites hard on long rows. The loss multiplies its policy-gradient token
term by w before aggregation, pg[b, t] -> w[b, t] pg[b, t]; the KL and entropy terms are
not reweighted, and a weight-0 token still counts in the aggregation's denominator (every
denominator is a batch constant, `losses.Totals`). `ppo_clip` with `token_tis` is the
decoupled PPO objective of Hilton et al. 2021 (Batch size-invariance for policy
optimization) as in AReaL, also registered as the loss `decoupled_ppo`.

Masked tokens never leak: the log-ratio goes through `jnp.where(mask, x, 0)` before any exp
or sum, so garbage (inf, nan) there changes neither the weights nor the metrics.
Metrics whose names end in `_max` are maxima (micro-batches combine them by max, not sum).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from vlmgym_train.losses import LossInputs

ISCorrection = Literal["none", "token_tis", "seq_tis", "token_mask"]
IS_CORRECTIONS: tuple[str, ...] = ("none", "token_tis", "seq_tis", "token_mask")


def check_correction(correction: str, cap: float) -> None:
    """`ValueError` unless `correction` is one of `IS_CORRECTIONS` and `cap` a finite C > 1."""
    if correction not in IS_CORRECTIONS:
        raise ValueError(f"is_correction must be one of {IS_CORRECTIONS}, got {correction!r}")
    if not 1.0 < cap < math.inf:
        raise ValueError(f"is_cap must be a finite number > 1, got {cap}")


def _mean(values: jax.Array, m: jax.Array, tokens: jax.Array | None) -> jax.Array:
    """sum over masked tokens of `values` / max(tokens or sum(m), 1)."""
    count = m.sum().astype(jnp.float32) if tokens is None else tokens
    return jnp.where(m, values, 0.0).astype(jnp.float32).sum() / jnp.maximum(count, 1.0)


def behaviour_log_ratio(
    old_logp: jax.Array, behaviour_logp: jax.Array | None, mask: jax.Array
) -> jax.Array:
    """log rho = log pi_prox - log pi_behav on masked tokens, 0 elsewhere (stop-gradient).

    float[B, T], float[B, T] or None (rho = 1), float|bool[B, T] -> float32[B, T]
    """
    m = mask > 0
    if behaviour_logp is None:
        return jnp.zeros(m.shape, jnp.float32)
    d = jnp.where(m, old_logp.astype(jnp.float32) - behaviour_logp.astype(jnp.float32), 0.0)
    return jax.lax.stop_gradient(d)  # [B, T]


def importance_weights(
    old_logp: jax.Array,
    behaviour_logp: jax.Array | None,
    mask: jax.Array,
    correction: ISCorrection,
    cap: float,
    tokens: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The stop-gradient weight w float32[B, T] of each token (0 outside `mask`; see the
    module docstring for each correction's formula) and its metrics.

    tokens: the denominator of the token means (the whole batch's masked tokens when this
      is one micro-batch of it); None: sum(mask).

    Metrics (over masked tokens; `seq_tis` counts every token of a row): is/weight_mean,
    is/weight_max, is/truncated_frac (tokens whose weight the cap lowered: rho > C, or the
    row's product > C), and for token_mask is/masked_frac (weight 0: rho outside [1/C, C]).
    """
    check_correction(correction, cap)
    m = mask > 0
    log_rho = behaviour_log_ratio(old_logp, behaviour_logp, mask)  # [B, T]
    log_cap = math.log(cap)
    metrics: dict[str, jax.Array] = {}
    if correction == "none":
        w = jnp.ones(m.shape, jnp.float32)  # [B, T]
        truncated = jnp.zeros(m.shape, bool)  # [B, T]
    elif correction == "token_tis":
        w = jnp.exp(jnp.minimum(log_rho, log_cap))  # [B, T]
        truncated = log_rho > log_cap  # [B, T]
    elif correction == "seq_tis":
        log_seq = log_rho.sum(axis=1, keepdims=True)  # [B, 1]
        w = jnp.broadcast_to(jnp.exp(jnp.minimum(log_seq, log_cap)), m.shape)  # [B, T]
        truncated = jnp.broadcast_to(log_seq > log_cap, m.shape)  # [B, T]
    else:  # token_mask
        truncated = jnp.abs(log_rho) > log_cap  # [B, T]
        w = jnp.where(truncated, 0.0, 1.0)  # [B, T]
        metrics["is/masked_frac"] = _mean(truncated, m, tokens)
    w = jnp.where(m, w, 0.0)
    metrics["is/weight_mean"] = _mean(w, m, tokens)
    metrics["is/weight_max"] = w.max()
    metrics["is/truncated_frac"] = _mean(truncated & m, m, tokens)
    return w, jax.tree.map(jax.lax.stop_gradient, metrics)


def sampler_gap(
    logp: jax.Array,
    behaviour_logp: jax.Array,
    mask: jax.Array,
    tokens: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """How far the trainer's log-probs are from the sampler's on the sampled tokens:
    monitor/sampler_gap_mean and monitor/sampler_gap_max of |logp - behaviour_logp| over
    masked tokens (0 with none; stop-gradient).

    On the first update of a step whose batch was sampled with the current params, logp
    is log pi_trainer under exactly the sampling params: the gap is then the sampler /
    trainer mismatch alone: below 1e-6 in float32 here, where both run the same code; a
    bf16 trainer against the fp32 sampler gives ~2e-3 at most on the tiny preset.

    float[B, T], float[B, T], float|bool[B, T] -> {name: float32[]}
    """
    m = mask > 0
    gap = jnp.abs(jnp.where(m, logp.astype(jnp.float32) - behaviour_logp.astype(jnp.float32), 0.0))
    gap = jax.lax.stop_gradient(gap)  # [B, T]
    return {
        "monitor/sampler_gap_mean": _mean(gap, m, tokens),
        "monitor/sampler_gap_max": gap.max(),
    }


def reweight(
    pg: jax.Array, batch: LossInputs, correction: ISCorrection, cap: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """A loss's policy-gradient token term float[B, T] times the correction's weights, and
    the metrics: the sampler gap (every loss reports it) and, with a correction, is/*.

    With correction "none", `pg` comes back unchanged (not multiplied by ones).
    """
    tokens = None if batch.totals is None else batch.totals.tokens
    behaviour = batch.old_logp if batch.behaviour_logp is None else batch.behaviour_logp
    metrics = sampler_gap(batch.logp, behaviour, batch.mask, tokens)
    if correction == "none":
        return pg, metrics
    w, is_metrics = importance_weights(
        batch.old_logp, batch.behaviour_logp, batch.mask, correction, cap, tokens
    )
    return pg * w, {**metrics, **is_metrics}  # [B, T]
