"""Policy losses for GRPO and its relatives, as registered pure functions.

    fn(batch: LossInputs, config: LossConfig) -> (loss: float[], metrics: dict[str, float[]])

`batch` holds per-token arrays for B completions padded to T tokens; `config` (a frozen,
hashable dataclass: pass it as a static argument under jit) holds the clip range, the
aggregation over tokens, and the KL and entropy coefficients. Every loss is

    loss = agg(pg[b, t]) + kl_coef * agg(w[b, t] kl[b, t]) - entropy_coef * agg'(H[b, t])

over the completion tokens (`mask`), where `pg` is the loss's policy-gradient term, `kl` the
chosen estimator of KL(pi_theta || pi_ref), `w` 1 or the loss's importance ratio
(`kl_ratio`), and `H` the token entropy (when given); agg' is `agg` or a token mean
(`entropy_aggregation`).

Registered: `ppo_clip` (GRPO, DAPO, Dr. GRPO), `gspo` (sequence-level ratio), `reinforce`
(no ratio). Pick one with `get_loss(name)`; add one with `@register_loss("name")`. Stale or
mismatched samples: `LossConfig.is_correction` weighs pg (`offpolicy.py`).

Recipes:
- GRPO: `grpo` advantages, `ppo_clip`, aggregation="seq_mean", kl_coef=0.04, kl_estimator="k3".
- DAPO: `grpo` advantages + `dynamic_sampling_mask`, `ppo_clip` with clip_low=0.2,
  clip_high=0.28, aggregation="token_mean", kl_coef=0, plus `overlong_penalty` on rewards.
- Dr. GRPO: `dr_grpo` advantages, `ppo_clip`, aggregation="constant", max_tokens=the
  generation budget.
- GSPO: `grpo` advantages, `gspo`, aggregation="seq_mean", clip_low=3e-4, clip_high=4e-4.
- LUSPO: as GSPO with aggregation="seq_sum", seq_denominator="all".

TRL's GRPOTrainer (1.16) and verl's loss_agg_mode are reproduced exactly: README.md maps
their options onto these settings (checked in tests/train/test_trl_compat.py).

Tokens outside `mask` never reach the loss or its gradient: every per-token quantity goes
through `jnp.where(mask, x, 0)` before any exp, so their gradient is exactly zero even when
their log-probs are garbage (inf or nan) there. DAPO's masks and shaping: `shaping.py`.
Metrics are stop-gradient scalars; token statistics are means over masked tokens, except
those named `*_max` (maxima over masked tokens).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from vlmgym_train.offpolicy import ISCorrection, check_correction, reweight

Aggregation = Literal["token_mean", "seq_mean", "seq_sum", "constant", "token_sum_norm"]
SeqDenominator = Literal["nonempty", "all"]
KLEstimator = Literal["k1", "k2", "k3"]
AGGREGATIONS: tuple[str, ...] = ("token_mean", "seq_mean", "seq_sum", "constant", "token_sum_norm")
SEQ_DENOMINATORS: tuple[str, ...] = ("nonempty", "all")
ENTROPY_AGGREGATIONS: tuple[str, ...] = ("loss", "token_mean")
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Totals:
    """Counts over a whole (mini)batch, for a loss evaluated on one micro-batch of it.

    With these as denominators, every aggregation and every metric of a loss is a sum over
    rows divided by a batch constant, so the loss, its gradient and its metrics over the
    batch are the sums of those over its micro-batches (`vlmgym_train.microbatch`).
    """

    tokens: jax.Array  # float32[]: masked tokens
    rows: jax.Array  # float32[]: rows (empty ones included)
    nonempty: jax.Array  # float32[]: rows with at least one masked token

    @classmethod
    def of(cls, mask: ArrayLike) -> Totals:
        m = jnp.asarray(mask, jnp.float32)
        lengths = m.sum(axis=-1)
        return cls(m.sum(), jnp.float32(m.shape[0]), (lengths > 0).sum().astype(jnp.float32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LossInputs:
    """Per-token inputs of a policy loss (a pytree: it can cross jit boundaries).

    logp: float[B, T]        log pi_theta(y_t | y_<t, x) under the current params; the only
                             differentiable input.
    old_logp: float[B, T]    log-probs the ratio divides by (untempered): the sampler's, or
                             the proximal policy's, recomputed at the step's start.
    mask: float|bool[B, T]   1 on completion tokens up to and including the first stop
                             token, 0 on prompt and padding.
    advantages: float[B]     one advantage per sequence (`advantages.reshape(-1)`).
    ref_logp: float[B, T]    log-probs under the frozen reference policy; needed when
                             `kl_coef > 0`.
    entropy: float[B, T]     token entropy of pi_theta (differentiable); needed when
                             `entropy_coef > 0`, reported as a metric when given.
    num_tokens: float[]      "token_mean"'s denominator for a minibatch of a larger batch:
                             (the whole batch's completion tokens) / (minibatches), so every
                             token of it weighs the same in every update (TRL's "dapo").
                             None: this batch's own token count, sum(mask).
    totals: Totals           the whole batch's counts when this is one micro-batch of it
                             (every mean divides by them); None: this batch's own.
    kl_coef: float[]         this update's KL coefficient (a controller's, `--kl_target`);
                             None: `LossConfig.kl_coef` (> 0 puts the KL term in the loss).
    behaviour_logp: float[B, T]  the sampler's log-probs when `old_logp` was recomputed (the
                             IS corrections' pi_behav, the monitor's reference); None: old_logp.
    """

    logp: jax.Array
    old_logp: jax.Array
    mask: jax.Array
    advantages: jax.Array
    ref_logp: jax.Array | None = None
    entropy: jax.Array | None = None
    num_tokens: jax.Array | None = None
    totals: Totals | None = None
    kl_coef: jax.Array | None = None
    behaviour_logp: jax.Array | None = None

    @classmethod
    def from_batch(
        cls,
        batch: Any,
        logp: jax.Array,
        entropy: jax.Array | None = None,
        totals: Totals | None = None,
    ) -> LossInputs:
        """The loss's view of a training `vlmgym_train.batch.Batch` and the policy's
        log-probs (and entropies) of its completions."""
        return cls(
            logp=logp,
            old_logp=batch.old_logp,
            mask=batch.mask,
            advantages=batch.advantages,
            ref_logp=batch.ref_logp,
            entropy=entropy,
            num_tokens=batch.num_tokens,
            totals=totals,
            kl_coef=getattr(batch, "kl_coef", None),
            behaviour_logp=getattr(batch, "behaviour_logp", None),
        )


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Hyperparameters of the policy losses (hashable: a static argument under jit).

    clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high]. PPO/GRPO use
        0.2 for both; DAPO's clip-higher raises clip_high to 0.28; GSPO's sequence ratios
        need far smaller values (3e-4, 4e-4).
    dual_clip: optional c > 1 (dual-clip PPO): for A < 0 the token loss is capped at -c * A,
        so a huge ratio on a bad token cannot blow up the loss. verl's clip_ratio_c (on there
        by default at 3); equal to TRL's two-sided `delta` when c >= 1 + clip_high.
    aggregation: how token losses L[b, t] with mask M[b, t] become a scalar (see `aggregate`):
        "token_mean"      sum_{b,t} M L / sum_{b,t} M                   (DAPO, TRL bnpo/dapo)
        "seq_mean"        mean over rows b of sum_t M L / sum_t M      (GRPO, GSPO)
        "seq_sum"         mean over rows b of sum_t M L                (LUSPO)
        "constant"        sum_{b,t} M L / (B * max_tokens)             (Dr. GRPO)
        "token_sum_norm"  sum_{b,t} M L / max_tokens                   (verl's Dr. GRPO)
    seq_denominator: the rows "seq_mean" and "seq_sum" average over: "nonempty" (default;
        rows with no completion token, e.g. masked truncations, drop out and the rest weigh
        more; verl) or "all" (every row counts, empty ones as 0; TRL).
    max_tokens: the constant of "constant" and "token_sum_norm" (the generation budget);
        defaults to T.
    kl_coef: weight of the KL(pi_theta || pi_ref) penalty added to the loss (0 disables it).
    kl_estimator: per-token estimate of the KL, with d = ref_logp - logp:
        "k1"  -d                    unbiased, can be negative
        "k2"  d^2 / 2               biased, low variance
        "k3"  exp(d) - d - 1        unbiased, non-negative (Schulman's k3; GRPO's choice)
    kl_ratio: multiply each token's KL estimate by the loss's importance ratio pi_theta /
        pi_old (the token ratio; `gspo`: the sequence ratio), gradient included. The samples
        come from pi_old, so this makes the estimate unbiased for KL(pi_theta || pi_ref) off
        policy (DeepSeek-V3.2; TRL's use_bias_correction_kl). Off by default.
    entropy_coef: weight of the entropy bonus (subtracted from the loss).
    entropy_aggregation: "loss" (default; the entropy goes through `aggregation` like the
        other terms, as in verl) or "token_mean" (the mean token entropy of the batch,
        whatever the aggregation, as in TRL).
    is_correction, is_cap: the importance weight on pg for samples drawn by another policy
        than `old_logp`'s, and its cap C > 1 (`offpolicy.py`; "none", the default, is off).
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    aggregation: Aggregation = "token_mean"
    seq_denominator: SeqDenominator = "nonempty"
    max_tokens: int | None = None
    kl_coef: float = 0.0
    kl_estimator: KLEstimator = "k3"
    kl_ratio: bool = False
    entropy_coef: float = 0.0
    entropy_aggregation: Literal["loss", "token_mean"] = "loss"
    is_correction: ISCorrection = "none"
    is_cap: float = 2.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"clip_low must be in [0, 1), got {self.clip_low}")
        if self.clip_high < 0.0:
            raise ValueError(f"clip_high must be >= 0, got {self.clip_high}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 when set, got {self.dual_clip}")
        for name, choices in (
            ("aggregation", AGGREGATIONS), ("seq_denominator", SEQ_DENOMINATORS),
            ("entropy_aggregation", ENTROPY_AGGREGATIONS), ("kl_estimator", KL_ESTIMATORS),
        ):  # fmt: skip
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")
        if self.kl_coef < 0.0 or self.entropy_coef < 0.0:
            raise ValueError(
                f"kl_coef, entropy_coef must be >= 0: {self.kl_coef}, {self.entropy_coef}"
            )
        check_correction(self.is_correction, self.is_cap)


LossFn = Callable[[LossInputs, LossConfig], tuple[jax.Array, dict[str, jax.Array]]]
F = TypeVar("F", bound=LossFn)

LOSSES: dict[str, LossFn] = {}
"""name -> policy loss. Read it to list the choices; add with `register_loss`."""


def register_loss(name: str, *, overwrite: bool = False) -> Callable[[F], F]:
    """Decorator: register a policy loss under `name` (case-insensitive).

    Registering a taken name raises `ValueError` unless `overwrite=True`.
    """
    key = name.strip().lower()

    def decorator(fn: F) -> F:
        if key in LOSSES and not overwrite:
            raise ValueError(f"policy loss {key!r} is already registered")
        LOSSES[key] = fn
        return fn

    return decorator


def get_loss(name: str) -> LossFn:
    """The policy loss registered under `name`; `KeyError` lists the choices."""
    key = name.strip().lower()
    if key not in LOSSES:
        raise KeyError(f"unknown policy loss {name!r}; registered: {', '.join(sorted(LOSSES))}")
    return LOSSES[key]


# ----------------------------------------------------------------------------- reductions


def aggregate(
    values: jax.Array,
    mask: jax.Array,
    mode: Aggregation,
    *,
    max_tokens: int | None = None,
    seq_denominator: SeqDenominator = "nonempty",
    num_tokens: jax.Array | float | None = None,
    totals: Totals | None = None,
) -> jax.Array:
    """Reduce token values float[B, T] to a scalar over `mask` (see `LossConfig.aggregation`).

        token_mean     = sum_{b,t} M v / max(N, 1),   N = num_tokens or sum_{b,t} M
        seq_mean       = sum_b [sum_t M v / max(sum_t M, 1)] / max(R, 1)
        seq_sum        = sum_b [sum_t M v] / max(R, 1)
        constant       = sum_{b,t} M v / (B * max_tokens)        (max_tokens defaults to T)
        token_sum_norm = sum_{b,t} M v / max_tokens

    R is the number of rows with a completion token (seq_denominator="nonempty") or B
    ("all"). Rows with an empty mask (dropped groups, masked truncations, batch padding)
    add nothing; they count in R only with "all", and always in `constant`'s B.
    With `totals` (a micro-batch of a larger batch), N, R and B are the whole batch's.
    """
    m = mask.astype(jnp.float32)
    v = jnp.where(m > 0, values, 0.0) * m  # [B, T]
    T = values.shape[1]
    own = Totals.of(m) if totals is None else totals
    B = own.rows
    budget = max_tokens if max_tokens is not None else T
    if mode == "token_mean":
        count = own.tokens if num_tokens is None else jnp.asarray(num_tokens, jnp.float32)
        return v.sum() / jnp.maximum(count, 1.0)
    if mode in ("seq_mean", "seq_sum"):
        lengths = m.sum(axis=1)  # [B]
        per_seq = v.sum(axis=1)  # [B]
        if mode == "seq_mean":
            per_seq = per_seq / jnp.maximum(lengths, 1.0)  # [B]
        if seq_denominator not in SEQ_DENOMINATORS:
            raise ValueError(f"seq_denominator {seq_denominator!r}: choose from {SEQ_DENOMINATORS}")
        rows = B if seq_denominator == "all" else own.nonempty
        return per_seq.sum() / jnp.maximum(rows, 1.0)
    if mode == "constant":
        return v.sum() / (B * budget)
    if mode == "token_sum_norm":
        return v.sum() / budget
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")


def masked_mean(values: jax.Array, mask: jax.Array, totals: Totals | None = None) -> jax.Array:
    """sum(M * v) / max(sum(M), 1) over all tokens; values outside the mask are ignored.
    With `totals`, divided by the whole batch's token count instead."""
    return aggregate(values, mask, "token_mean", totals=totals)


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, estimator: KLEstimator) -> jax.Array:
    """Per-token estimate of KL(pi_theta || pi_ref) from samples of pi_theta.

    With d = ref_logp - logp (log of pi_ref / pi_theta at the sampled token):
        k1 = -d,   k2 = d^2 / 2,   k3 = exp(d) - d - 1

    float[B, T], float[B, T] -> float[B, T]
    """
    d = ref_logp - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return jnp.exp(d) - d - 1.0
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def _check(batch: LossInputs) -> None:
    shape = batch.logp.shape
    if len(shape) != 2:
        raise ValueError(f"logp must be float[B, T], got shape {shape}")
    for name in ("old_logp", "mask", "ref_logp", "entropy", "behaviour_logp"):
        x = getattr(batch, name)
        if x is not None and x.shape != shape:
            raise ValueError(f"{name} has shape {x.shape}, logp has {shape}")
    if batch.advantages.shape != shape[:1]:
        raise ValueError(f"advantages must be float[B] = {shape[:1]}, got {batch.advantages.shape}")


def _finish(
    pg: jax.Array,
    log_ratio: jax.Array,
    batch: LossInputs,
    config: LossConfig,
    metrics: dict[str, jax.Array],
    kl_weight: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Add the KL and entropy terms to the policy-gradient token loss `pg`, and the metrics.

    kl_weight: float[B, T] or float[B, 1], the loss's differentiable importance ratio; the
    KL estimate is multiplied by it when `config.kl_ratio`.
    """
    m = batch.mask > 0
    totals = batch.totals
    agg = dict(mode=config.aggregation, max_tokens=config.max_tokens, totals=totals,
               seq_denominator=config.seq_denominator, num_tokens=batch.num_tokens)  # fmt: skip
    pg, off_policy = reweight(pg, batch, config.is_correction, config.is_cap)  # [B, T]
    metrics = {**metrics, **off_policy}
    pg_loss = aggregate(pg, batch.mask, **agg)
    loss = pg_loss
    metrics["loss/pg"] = pg_loss
    if batch.ref_logp is not None:
        d_logp = jnp.where(m, batch.logp, 0.0)
        d_ref = jnp.where(m, batch.ref_logp, 0.0)
        kl = kl_penalty(d_logp, d_ref, config.kl_estimator)  # [B, T]
        metrics["kl/ref"] = masked_mean(kl, batch.mask, totals)
        if config.kl_ratio:
            kl = kl * kl_weight  # [B, T]
        kl_loss = aggregate(kl, batch.mask, **agg)
        if config.kl_coef > 0:
            coef = config.kl_coef if batch.kl_coef is None else batch.kl_coef
            loss = loss + coef * kl_loss
            metrics["loss/kl"] = kl_loss
    elif config.kl_coef > 0:
        raise ValueError("kl_coef > 0 needs LossInputs.ref_logp (the reference log-probs)")
    if batch.entropy is not None:
        ent = jnp.where(m, batch.entropy, 0.0)
        if config.entropy_aggregation == "token_mean":
            ent_agg = masked_mean(ent, batch.mask, totals)
        else:
            ent_agg = aggregate(ent, batch.mask, **agg)
        metrics["entropy"] = masked_mean(ent, batch.mask, totals)
        if config.entropy_coef > 0:
            loss = loss - config.entropy_coef * ent_agg
            metrics["loss/entropy"] = ent_agg
    elif config.entropy_coef > 0:
        raise ValueError("entropy_coef > 0 needs LossInputs.entropy (token entropies)")
    # PPO's approx_kl, KL(pi_old || pi_theta) by k3 on behaviour samples: (r - 1) - log r
    metrics["approx_kl"] = masked_mean(jnp.expm1(log_ratio) - log_ratio, batch.mask, totals)
    metrics["ratio/mean"] = masked_mean(jnp.exp(log_ratio), batch.mask, totals)
    metrics["tokens"] = batch.mask.astype(jnp.float32).sum()
    metrics["loss"] = loss
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def _clip_fractions(
    ratio: jax.Array, adv: jax.Array, batch: LossInputs, config: LossConfig
) -> dict[str, jax.Array]:
    """Fractions of masked tokens where the clipped branch is active (zero gradient)."""
    low = (ratio < 1.0 - config.clip_low) & (adv < 0)
    high = (ratio > 1.0 + config.clip_high) & (adv > 0)
    return {
        "clip_frac/low": masked_mean(low.astype(jnp.float32), batch.mask, batch.totals),
        "clip_frac/high": masked_mean(high.astype(jnp.float32), batch.mask, batch.totals),
    }


def _clipped_objective(ratio: jax.Array, adv: jax.Array, config: LossConfig) -> jax.Array:
    """-min(r A, clip(r, 1 - low, 1 + high) A), capped at -c A for A < 0 with dual clip."""
    pg = jnp.maximum(
        -adv * ratio, -adv * jnp.clip(ratio, 1.0 - config.clip_low, 1.0 + config.clip_high)
    )
    if config.dual_clip is not None:
        pg = jnp.where(adv < 0, jnp.minimum(pg, -adv * config.dual_clip), pg)
    return pg


# ----------------------------------------------------------------------------- losses


@register_loss("ppo_clip")
def ppo_clip(batch: LossInputs, config: LossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token-level clipped surrogate (PPO; GRPO, DAPO and Dr. GRPO differ only in config).

        r[b, t]  = exp(logp[b, t] - old_logp[b, t])
        pg[b, t] = -min(r A[b], clip(r, 1 - clip_low, 1 + clip_high) A[b])
                   (dual clip: for A[b] < 0, pg = min(pg, -dual_clip * A[b]))
        loss     = agg(pg) + kl_coef * agg(w kl) - entropy_coef * agg'(H)
                   (w = r when kl_ratio, else 1)

    The gradient of a token is zero when its ratio is clipped on the side the advantage
    pushes toward: r > 1 + clip_high with A > 0, or r < 1 - clip_low with A < 0. With
    `is_correction` "token_tis" and `old_logp` recomputed at the step's start (the trainer
    does so when a correction is on), pg[b, t] * min(pi_prox / pi_behav, is_cap) is the
    decoupled PPO objective (Hilton et al. 2021, as in AReaL; `offpolicy.py`).

    Metrics: loss, loss/pg, loss/kl, loss/entropy, clip_frac/low, clip_frac/high (fractions of
    tokens with zero gradient from each bound), ratio/mean, approx_kl (mean of (r - 1) -
    log r: KL(pi_old || pi_theta)), kl/ref, entropy, tokens.
    """
    _check(batch)
    m = batch.mask > 0
    log_ratio = jnp.where(m, batch.logp - batch.old_logp, 0.0)  # [B, T]
    ratio = jnp.exp(log_ratio)  # [B, T]
    adv = batch.advantages.astype(jnp.float32)[:, None]  # [B, 1]
    pg = _clipped_objective(ratio, adv, config)  # [B, T]
    metrics = _clip_fractions(ratio, adv, batch, config)
    return _finish(pg, log_ratio, batch, config, metrics, kl_weight=ratio)


@register_loss("gspo")
def gspo(batch: LossInputs, config: LossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GSPO (Zheng et al. 2025): one importance ratio per sequence, clipped per sequence.

        s[b]     = exp( sum_t M (logp - old_logp) / sum_t M )   (length-normalised)
        s[b, t]  = sg(s[b]) * exp(logp[b, t] - sg(logp[b, t]))  (GSPO-token: value s[b])
        pg[b, t] = -min(s[b, t] A[b], clip(s[b, t], 1 - clip_low, 1 + clip_high) A[b])

    sg is stop-gradient. Each token's gradient is -s[b] A[b] grad logp[b, t] (times the
    aggregation weight) when s[b] is unclipped, and zero for the whole sequence when it is
    clipped. With aggregation="seq_mean" this is exactly the paper's sequence objective
    (1/B) sum_b min(s[b] A[b], clip(s[b]) A[b]); use clip ranges around 3e-4 / 4e-4. Every
    aggregation weighs the tokens of a row equally, so loss and gradient equal those of the
    sequence form -min(s[b] A[b], clip(s[b]) A[b]) broadcast over the row's tokens (TRL's
    importance_sampling_level="sequence") under any aggregation. With kl_ratio the KL is
    weighted by s[b] itself, gradient through the mean log-ratio included (as TRL does).

    Metrics: as `ppo_clip`; clip fractions count tokens of clipped sequences, ratio/mean is
    the token ratio, and ratio/seq_mean the mean of s[b] over non-empty sequences.
    """
    _check(batch)
    m = batch.mask > 0
    log_ratio = jnp.where(m, batch.logp - batch.old_logp, 0.0)  # [B, T]
    lengths = m.sum(axis=1)  # [B]
    seq_log_ratio = log_ratio.sum(axis=1) / jnp.maximum(lengths, 1)  # [B]
    token_grad = jnp.where(m, batch.logp - jax.lax.stop_gradient(batch.logp), 0.0)  # [B, T]
    ratio = jnp.exp(jax.lax.stop_gradient(seq_log_ratio)[:, None] + token_grad)  # [B, T]
    adv = batch.advantages.astype(jnp.float32)[:, None]  # [B, 1]
    pg = _clipped_objective(ratio, adv, config)  # [B, T]
    metrics = _clip_fractions(ratio, adv, batch, config)
    seq_ratio = jnp.exp(seq_log_ratio)  # [B]
    nonempty = (lengths > 0).sum() if batch.totals is None else batch.totals.nonempty
    seq_mean = jnp.where(lengths > 0, seq_ratio, 0.0).sum() / jnp.maximum(nonempty, 1)
    metrics["ratio/seq_mean"] = seq_mean
    return _finish(pg, log_ratio, batch, config, metrics, kl_weight=seq_ratio[:, None])


@register_loss("reinforce")
def reinforce(batch: LossInputs, config: LossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """REINFORCE / vanilla policy gradient: no ratio, no clipping (on-policy only).

        pg[b, t] = -A[b] * logp[b, t]
        loss     = agg(pg) + kl_coef * agg(w kl) - entropy_coef * agg'(H)
                   (w = exp(logp - old_logp) when kl_ratio, else 1)

    On-policy (logp == old_logp) its gradient equals `ppo_clip`'s. `old_logp` is used only
    for the ratio/mean and approx_kl metrics; clip_low, clip_high, dual_clip are ignored.
    """
    _check(batch)
    m = batch.mask > 0
    log_ratio = jnp.where(m, batch.logp - batch.old_logp, 0.0)  # [B, T]
    adv = batch.advantages.astype(jnp.float32)[:, None]  # [B, 1]
    pg = -adv * jnp.where(m, batch.logp, 0.0)  # [B, T]
    return _finish(pg, log_ratio, batch, config, {}, kl_weight=jnp.exp(log_ratio))
