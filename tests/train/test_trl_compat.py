"""vlm-gym's losses and advantages against TRL's GRPOTrainer and verl, on the same inputs.

The losses are checked against TRL itself: `GRPOTrainer._compute_loss` (trl 1.16.0, the
version in uv.lock) runs on a stand-in trainer whose model returns per-token log-probs we
inject, so loss and gradient (w.r.t. those log-probs and the entropies) come from TRL's own
code. Each TRL setting is paired with the vlm-gym flags the README table lists for it.

TRL's advantages live inside `_generate_and_score_completions` (generation, reward calls),
which cannot run without a model; they are transcribed below from trl 1.16.0 (the
`multi_objective_aggregation == "sum_then_normalize"` branch) using TRL's own `nanstd`.
verl (0.8.0.dev, `verl/trainer/ppo/core_algos.py`: `agg_loss`,
`compute_grpo_outcome_advantage`) is not installable here; its formulas are transcribed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import jax
import numpy as np
import pytest
import torch
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.utils import nanstd
from vlmgym_train import LossConfig, LossInputs, aggregate, get_advantage, get_loss

# What "agree" means here: 1e-7, relative to values above 1 (one float32 ulp at 1 is 1.2e-7).
MATCH = 1e-7


def close(got: np.ndarray | float, want: np.ndarray | float) -> bool:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return bool(np.all(np.abs(got - want) <= MATCH * np.maximum(1.0, np.abs(want))))


B, T = 5, 6
LENGTHS = [6, 3, 0, 1, 5]  # row 2 is empty (a masked truncation)
ADV = np.array([1.0, -0.5, 2.0, -1.5, 0.7], np.float32)


def make_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.zeros((B, T), np.float32)
    for b, n in enumerate(LENGTHS):
        mask[b, :n] = 1.0
    logp = -rng.uniform(0.1, 3.0, (B, T)).astype(np.float32)
    # Ratios spread over ~[0.4, 2.5]: both clip bounds and the dual clip are active somewhere.
    old = (logp + rng.normal(0.0, 0.4, (B, T))).astype(np.float32)
    old[1] = logp[1] - 0.05  # a sequence whose ratio stays inside the clip range (GSPO)
    old[4] = logp[4] + 0.02
    ref = (logp + rng.normal(0.0, 0.5, (B, T))).astype(np.float32)
    ent = rng.uniform(0.0, 2.0, (B, T)).astype(np.float32)
    return dict(logp=logp, old_logp=old, ref_logp=ref, entropy=ent, mask=mask)


# ----------------------------------------------------------------------------- TRL side


def trl_loss(
    d: dict[str, np.ndarray],
    *,
    loss_type: str,
    level: str = "token",
    epsilon: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    beta: float = 0.0,
    bias_correction_kl: bool = False,
    entropy_coef: float = 0.0,
    max_completion_length: int = T,
    num_items_in_batch: float | None = None,
    steps_per_generation: int = 1,
) -> tuple[float, np.ndarray, np.ndarray]:
    """TRL's `_compute_loss` on injected log-probs: (loss, d loss/d logp, d loss/d entropy).

    One process, no gradient accumulation, train mode. `num_items_in_batch` is the completion
    token count of the whole generation batch (default: this batch's), `steps_per_generation`
    the number of optimizer steps it is split into (vlm-gym's minibatches).
    """
    logp = torch.tensor(d["logp"], requires_grad=True)
    entropy = torch.tensor(d["entropy"], requires_grad=True)
    mask = torch.tensor(d["mask"]).long()  # TRL's completion_mask is an integer tensor
    n_items = float(d["mask"].sum()) if num_items_in_batch is None else num_items_in_batch
    accelerator = SimpleNamespace(
        num_processes=1,
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        reduce=lambda x, reduction: x,
        sync_gradients=True,
    )
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logp, entropy, None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=epsilon,
        epsilon_high=epsilon_high,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length,
        accelerator=accelerator,
        _entropy_bonus_enabled=entropy_coef > 0,
        entropy_coef=entropy_coef,
        use_adaptive_entropy=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(
            delta=delta,
            use_bias_correction_kl=bias_correction_kl,
            steps_per_generation=steps_per_generation,
        ),
    )
    inputs = {
        "prompt_ids": torch.zeros((B, 1), dtype=torch.long),
        "prompt_mask": torch.ones((B, 1), dtype=torch.long),
        "completion_ids": torch.zeros((B, T), dtype=torch.long),
        "completion_mask": mask,
        "advantages": torch.tensor(ADV),
        "old_per_token_logps": torch.tensor(d["old_logp"]),
        "ref_per_token_logps": torch.tensor(d["ref_logp"]),
        "num_items_in_batch": torch.tensor(n_items),
    }
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    g_ent = np.zeros((B, T), np.float32) if entropy.grad is None else entropy.grad.numpy()
    return float(loss.detach()), logp.grad.numpy(), g_ent


# ----------------------------------------------------------------------------- vlm-gym side


@functools.cache
def compiled(name: str, cfg: LossConfig):
    fn = get_loss(name)

    @jax.jit
    def run(batch: LossInputs):
        def scalar(logp, entropy):
            return fn(dataclasses.replace(batch, logp=logp, entropy=entropy), cfg)[0]

        return jax.value_and_grad(scalar, argnums=(0, 1))(batch.logp, batch.entropy)

    return run


def ours(
    d: dict[str, np.ndarray], name: str, cfg: LossConfig, num_tokens: float | None = None
) -> tuple[float, np.ndarray, np.ndarray]:
    batch = LossInputs(
        logp=jax.numpy.asarray(d["logp"]),
        old_logp=jax.numpy.asarray(d["old_logp"]),
        mask=jax.numpy.asarray(d["mask"]),
        advantages=jax.numpy.asarray(ADV),
        ref_logp=jax.numpy.asarray(d["ref_logp"]),
        entropy=jax.numpy.asarray(d["entropy"]),
        num_tokens=None if num_tokens is None else jax.numpy.float32(num_tokens),
    )
    loss, (g_logp, g_ent) = compiled(name, cfg)(batch)
    return float(loss), np.asarray(g_logp), np.asarray(g_ent)


# TRL loss_type (and importance_sampling_level) -> vlm-gym loss and aggregation flags.
LOSS_TYPES: dict[str, tuple[dict[str, Any], str, dict[str, Any]]] = {
    "grpo": (
        dict(loss_type="grpo"),
        "ppo_clip",
        dict(aggregation="seq_mean", seq_denominator="all"),
    ),
    "bnpo": (dict(loss_type="bnpo"), "ppo_clip", dict(aggregation="token_mean")),
    "dr_grpo": (
        dict(loss_type="dr_grpo", max_completion_length=8),
        "ppo_clip",
        dict(aggregation="constant", max_tokens=8),
    ),
    "dapo": (dict(loss_type="dapo"), "ppo_clip", dict(aggregation="token_mean")),
    "gspo": (
        dict(loss_type="grpo", level="sequence"),
        "gspo",
        dict(aggregation="seq_mean", seq_denominator="all"),
    ),
    "gspo_dapo": (dict(loss_type="dapo", level="sequence"), "gspo", dict(aggregation="token_mean")),
    "luspo": (
        dict(loss_type="luspo", level="sequence"),
        "gspo",
        dict(aggregation="seq_sum", seq_denominator="all"),
    ),
}

# Options layered on top: TRL keyword arguments -> LossConfig fields.
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "plain": ({}, {}),
    "clip_higher": (dict(epsilon_high=0.28), dict(clip_high=0.28)),
    "kl": (dict(beta=0.04), dict(kl_coef=0.04, kl_estimator="k3")),
    "kl_ratio": (
        dict(beta=0.04, bias_correction_kl=True, epsilon_high=0.28),
        dict(kl_coef=0.04, kl_estimator="k3", kl_ratio=True, clip_high=0.28),
    ),
    "delta_entropy": (
        dict(delta=1.5, entropy_coef=0.01),
        dict(dual_clip=1.5, entropy_coef=0.01, entropy_aggregation="token_mean"),
    ),
}

# Sequence-level ratios live close to 1: narrower clip ranges keep both outcomes in play.
SEQUENCE_CLIP = (dict(epsilon=0.05, epsilon_high=0.08), dict(clip_low=0.05, clip_high=0.08))


def _pair(loss_type: str, variant: str) -> tuple[dict[str, Any], str, LossConfig]:
    trl_kw, name, cfg_kw = LOSS_TYPES[loss_type]
    trl_kw, cfg_kw = dict(trl_kw), dict(cfg_kw)
    if trl_kw.get("level") == "sequence":
        trl_kw.update(SEQUENCE_CLIP[0])
        cfg_kw.update(SEQUENCE_CLIP[1])
    v_trl, v_cfg = VARIANTS[variant]
    if "epsilon_high" in v_trl and trl_kw.get("level") == "sequence":
        v_trl, v_cfg = dict(v_trl, epsilon_high=0.1), dict(v_cfg, clip_high=0.1)
    return {**trl_kw, **v_trl}, name, LossConfig(**{**cfg_kw, **v_cfg})


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_loss_and_gradient_match_trl(loss_type: str, variant: str) -> None:
    d = make_inputs()
    trl_kw, name, cfg = _pair(loss_type, variant)
    want_loss, want_g, want_ge = trl_loss(d, **trl_kw)
    loss, g, ge = ours(d, name, cfg)
    assert np.any(want_g != 0.0)  # something to compare
    assert np.all(g[d["mask"] == 0] == 0.0)
    assert close(loss, want_loss), (loss, want_loss)
    assert close(g, want_g), np.abs(g - want_g).max()
    assert close(ge, want_ge), np.abs(ge - want_ge).max()


@pytest.mark.parametrize("loss_type", ["dapo", "gspo_dapo"])
def test_dapo_normaliser_over_the_generation_batch(loss_type: str) -> None:
    """TRL's dapo divides by the generation batch's tokens / steps_per_generation; vlm-gym's
    `--token_normaliser batch` passes the same number as `LossInputs.num_tokens`."""
    d = make_inputs(1)
    trl_kw, name, cfg = _pair(loss_type, "kl")
    gen_tokens, minibatches = 3.5 * d["mask"].sum(), 2  # this batch is one of 2 minibatches
    want_loss, want_g, _ = trl_loss(
        d, **trl_kw, num_items_in_batch=gen_tokens, steps_per_generation=minibatches
    )
    loss, g, _ = ours(d, name, cfg, num_tokens=gen_tokens / minibatches)
    assert close(loss, want_loss), (loss, want_loss)
    assert close(g, want_g), np.abs(g - want_g).max()
    local, _, _ = ours(d, name, cfg)  # the per-minibatch normaliser differs
    assert abs(local - loss) > 1e-3


def test_empty_rows_count_in_trl_grpo_only_with_seq_denominator_all() -> None:
    d = make_inputs(2)
    want, _, _ = trl_loss(d, loss_type="grpo")
    got_all, _, _ = ours(d, "ppo_clip", LossConfig(aggregation="seq_mean", seq_denominator="all"))
    got_ne, _, _ = ours(d, "ppo_clip", LossConfig(aggregation="seq_mean"))
    assert close(got_all, want), (got_all, want)
    assert got_ne == pytest.approx(want * B / (B - 1), abs=1e-6)  # one empty row of B


# ----------------------------------------------------------------------------- advantages

REWARDS = np.array(
    [[1.0, 0.0, 0.0, 1.0], [0.1, 0.1, 0.1, 0.1], [0.0, 0.2, 0.9, 3.0], [0.3, 0.3, 0.7, 0.3]],
    np.float32,
)


def trl_advantages(rewards: np.ndarray, scale_rewards: str) -> np.ndarray:
    """trl 1.16.0 `_generate_and_score_completions`, one reward function, sum_then_normalize."""
    num_generations = rewards.shape[1]
    r = torch.tensor(rewards.reshape(-1))
    mean_grouped = torch.nanmean(r.view(-1, num_generations), dim=1)
    mean_grouped = mean_grouped.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        std = nanstd(r.view(-1, num_generations), dim=1).repeat_interleave(num_generations, dim=0)
    else:
        std = nanstd(r).expand_as(r)
    adv = r - mean_grouped
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0).numpy().reshape(rewards.shape)


def verl_grpo_advantages(rewards: np.ndarray, norm_by_std: bool) -> np.ndarray:
    """verl `compute_grpo_outcome_advantage` (epsilon=1e-6, groups of n >= 2)."""
    out = np.zeros_like(rewards)
    for g, row in enumerate(torch.tensor(rewards)):
        mean, std = torch.mean(row), torch.std(row)
        out[g] = ((row - mean) / (std + 1e-6) if norm_by_std else row - mean).numpy()
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantages_match_trl(scale: str) -> None:
    got = np.asarray(get_advantage("grpo")(REWARDS, eps=1e-4, ddof=1, scale=scale))
    want = trl_advantages(REWARDS, scale)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert np.all(got[1] == 0.0)


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_advantages_match_verl(norm_by_std: bool) -> None:
    scale = "group" if norm_by_std else "none"
    got = np.asarray(get_advantage("grpo")(REWARDS, eps=1e-6, ddof=1, scale=scale))
    np.testing.assert_allclose(got, verl_grpo_advantages(REWARDS, norm_by_std), atol=1e-5)
    assert np.all(got[1] == 0.0)


def test_population_std_default_differs_from_trl() -> None:
    """The difference the README documents: ddof=0, eps=1e-6 vs TRL's ddof=1, eps=1e-4."""
    ours_default = np.asarray(get_advantage("grpo")(REWARDS))
    gap = np.abs(ours_default - trl_advantages(REWARDS, "group")).max()
    assert 0.1 < gap < 0.3


# ----------------------------------------------------------------------------- verl agg_loss


def verl_agg_loss(
    loss_mat: np.ndarray, mask: np.ndarray, mode: str, global_batch_size: int | None = None
) -> float:
    """verl `agg_loss` with dp_size=1, batch_num_tokens=None, loss_scale_factor=None."""
    lm, m = torch.tensor(loss_mat, dtype=torch.float64), torch.tensor(mask, dtype=torch.float64)
    if mode == "token-mean":
        return float((lm * m).sum() / m.sum())
    if mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        seq = (lm * m).sum(-1)
        if mode == "seq-mean-token-mean":
            seq = seq / (m.sum(-1) + 1e-8)
        seq_mask = (m.sum(-1) > 0).double()
        denom = seq_mask.sum() if global_batch_size is None else global_batch_size
        return float((seq * seq_mask).sum() / denom)
    return float((lm * m).sum(-1).sum() / m.shape[-1])  # seq-mean-token-sum-norm


@pytest.mark.parametrize(
    ("mode", "ours_kw", "rows"),
    [
        ("token-mean", dict(mode="token_mean"), None),
        ("seq-mean-token-mean", dict(mode="seq_mean"), None),
        ("seq-mean-token-mean", dict(mode="seq_mean", seq_denominator="all"), B),
        ("seq-mean-token-sum", dict(mode="seq_sum"), None),
        ("seq-mean-token-sum", dict(mode="seq_sum", seq_denominator="all"), B),
        ("seq-mean-token-sum-norm", dict(mode="token_sum_norm"), None),
    ],
)
def test_aggregations_match_verl(mode: str, ours_kw: dict[str, Any], rows: int | None) -> None:
    d = make_inputs(3)
    values = d["logp"] * 3.0
    got = float(aggregate(jax.numpy.asarray(values), jax.numpy.asarray(d["mask"]), **ours_kw))
    assert got == pytest.approx(verl_agg_loss(values, d["mask"], mode, rows), rel=1e-6, abs=1e-6)
