"""Importance corrections for stale or mismatched samples (`vlmgym_train.offpolicy`) against
numpy references written here: the weights, their metrics, the corrected losses and their
gradients, with garbage (inf, nan) on masked tokens that must not leak."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from vlmgym_model import parse_args
from vlmgym_train import LossConfig, LossInputs, get_loss
from vlmgym_train.config import TrainConfig
from vlmgym_train.offpolicy import importance_weights, sampler_gap

B, T = 5, 7
LENGTHS = [7, 4, 0, 1, 6]  # row 2 is empty
ADV = np.array([1.0, -0.5, 2.0, -1.5, 0.7], np.float32)
CAP = 1.5
CORRECTIONS = ["token_tis", "seq_tis", "token_mask"]


def make_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Random log-probs; behaviour ratios spread enough that some exceed CAP (and 1 / CAP);
    garbage on every masked-out token."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((B, T), np.float32)
    for b, n in enumerate(LENGTHS):
        mask[b, :n] = 1.0
    logp = -rng.uniform(0.1, 3.0, (B, T)).astype(np.float32)
    old = (logp + rng.normal(0.0, 0.2, (B, T))).astype(np.float32)
    behaviour = (old + rng.normal(0.0, 0.6, (B, T))).astype(np.float32)
    off = mask == 0
    logp[off], old[off], behaviour[off] = 40.0, -np.inf, np.nan
    return dict(logp=logp, old_logp=old, behaviour_logp=behaviour, mask=mask, advantages=ADV)


def as_inputs(d: dict[str, np.ndarray], **over: object) -> LossInputs:
    d = {**d, **over}
    return LossInputs(**{k: None if v is None else jnp.asarray(v) for k, v in d.items()})


# ----------------------------------------------------------------------------- references


def ref_weights(d: dict[str, np.ndarray], mode: str, cap: float) -> tuple[np.ndarray, ...]:
    """(w[b, t], truncated[b, t]) token by token, float64."""
    w, cut = np.zeros((B, T)), np.zeros((B, T), bool)
    for b in range(B):
        tokens = [t for t in range(T) if d["mask"][b, t]]
        seq = math.exp(sum(float(d["old_logp"][b, t] - d["behaviour_logp"][b, t]) for t in tokens))
        for t in tokens:
            rho = math.exp(float(d["old_logp"][b, t]) - float(d["behaviour_logp"][b, t]))
            if mode == "token_tis":
                w[b, t], cut[b, t] = min(rho, cap), rho > cap
            elif mode == "seq_tis":
                w[b, t], cut[b, t] = min(seq, cap), seq > cap
            else:
                keep = 1.0 / cap <= rho <= cap
                w[b, t], cut[b, t] = float(keep), not keep
    return w, cut


def ref_ppo(d: dict[str, np.ndarray], w: np.ndarray, low: float, high: float):
    """Per-token w * -min(r A, clip(r) A) and its derivative in logp."""
    pg, grad = np.zeros((B, T)), np.zeros((B, T))
    for b in range(B):
        a = float(d["advantages"][b])
        for t in range(T):
            if not d["mask"][b, t]:
                continue
            r = math.exp(float(d["logp"][b, t]) - float(d["old_logp"][b, t]))
            pg[b, t] = w[b, t] * max(-a * r, -a * min(max(r, 1 - low), 1 + high))
            clipped = (r > 1 + high and a > 0) or (r < 1 - low and a < 0)
            grad[b, t] = 0.0 if clipped else -a * r * w[b, t]
    return pg, grad


def ref_agg_weights(mask: np.ndarray, mode: str) -> np.ndarray:
    """d(aggregate)/d(value[b, t]) for token_mean and seq_mean (non-empty rows)."""
    if mode == "token_mean":
        return mask / mask.sum()
    lengths = mask.sum(axis=1, keepdims=True)
    return mask / np.maximum(lengths, 1) / (lengths > 0).sum()


@functools.cache
def compiled(name: str, cfg: LossConfig):
    """jit(batch -> ((loss, metrics), d loss / d logp)), one per (loss, config)."""
    fn = get_loss(name)

    @jax.jit
    def run(batch: LossInputs):
        def scalar(logp):
            return fn(dataclasses.replace(batch, logp=logp), cfg)

        return jax.value_and_grad(scalar, has_aux=True)(batch.logp)

    return run


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("mode", CORRECTIONS)
def test_weights_and_metrics_match_the_reference(mode: str) -> None:
    d = make_batch(1)
    w, metrics = jax.jit(importance_weights, static_argnums=(3, 4))(
        d["old_logp"], d["behaviour_logp"], d["mask"], mode, CAP
    )
    want, cut = ref_weights(d, mode, CAP)
    m = d["mask"] > 0
    assert np.isfinite(np.asarray(w)).all()
    np.testing.assert_allclose(np.asarray(w), want, rtol=1e-5, atol=1e-6)
    assert 0 < cut[m].sum() < m.sum()  # the cap bites on some tokens, not all
    assert float(metrics["is/weight_mean"]) == pytest.approx(want[m].mean(), rel=1e-5)
    assert float(metrics["is/weight_max"]) == pytest.approx(want[m].max(), rel=1e-5)
    assert float(metrics["is/truncated_frac"]) == pytest.approx(cut[m].mean(), rel=1e-6)
    if mode == "token_mask":
        assert float(metrics["is/masked_frac"]) == pytest.approx((want[m] == 0).mean())
        assert set(np.unique(want[m])) == {0.0, 1.0}
    else:
        assert "is/masked_frac" not in metrics
        assert float(metrics["is/weight_max"]) <= CAP


@pytest.mark.parametrize("mode", CORRECTIONS)
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_corrected_ppo_clip_values_and_grads(mode: str, aggregation: str) -> None:
    """ppo_clip times the weights; with token_tis, the decoupled PPO objective."""
    d = make_batch(2)
    cfg = LossConfig(clip_low=0.2, clip_high=0.28, aggregation=aggregation,
                     is_correction=mode, is_cap=CAP)  # fmt: skip
    (loss, metrics), grad = compiled("ppo_clip", cfg)(as_inputs(d))
    w, _ = ref_weights(d, mode, CAP)
    pg, dpg = ref_ppo(d, w, 0.2, 0.28)
    agg = ref_agg_weights(d["mask"], aggregation)
    assert float(loss) == pytest.approx(float((pg * agg).sum()), rel=1e-5, abs=1e-7)
    grad = np.asarray(grad)
    assert np.isfinite(grad).all() and (grad[d["mask"] == 0] == 0).all()  # no leak
    np.testing.assert_allclose(grad, dpg * agg, rtol=1e-5, atol=1e-7)
    assert float(metrics["is/weight_max"]) > 0


def test_corrected_reinforce_and_gspo() -> None:
    """Every loss takes the weights on its pg term (reinforce: -A w logp)."""
    d = make_batch(3)
    cfg = LossConfig(aggregation="token_mean", is_correction="seq_tis", is_cap=CAP)
    (loss, _), grad = compiled("reinforce", cfg)(as_inputs(d))
    w, _ = ref_weights(d, "seq_tis", CAP)
    m = d["mask"]
    pg = np.where(m > 0, -ADV[:, None] * np.where(m > 0, d["logp"], 0.0) * w, 0.0)
    assert float(loss) == pytest.approx(float(pg.sum() / m.sum()), rel=1e-5)
    np.testing.assert_allclose(np.asarray(grad), -ADV[:, None] * w * m / m.sum(), rtol=1e-5)
    gspo_cfg = dataclasses.replace(cfg, clip_low=3e-4, clip_high=4e-4, is_correction="token_tis")
    (_, _), g = compiled("gspo", gspo_cfg)(as_inputs(d))
    assert np.isfinite(np.asarray(g)).all() and (np.asarray(g)[m == 0] == 0).all()


def test_none_and_on_policy_change_nothing() -> None:
    """is_correction none ignores behaviour_logp bit for bit; on policy (behaviour ==
    old) every correction's weights are exactly 1."""
    d = make_batch(4)
    plain = LossConfig(aggregation="seq_mean")
    (base, _), g_base = compiled("ppo_clip", plain)(as_inputs(d, behaviour_logp=None))
    (same, _), g_same = compiled("ppo_clip", plain)(as_inputs(d))
    assert float(same) == float(base) and (np.asarray(g_same) == np.asarray(g_base)).all()
    on_policy = as_inputs(d, behaviour_logp=d["old_logp"])
    for mode in CORRECTIONS:
        cfg = dataclasses.replace(plain, is_correction=mode, is_cap=CAP)
        (loss, metrics), g = compiled("ppo_clip", cfg)(on_policy)
        assert float(loss) == float(base) and (np.asarray(g) == np.asarray(g_base)).all(), mode
        assert float(metrics["is/weight_mean"]) == 1.0 and float(metrics["is/truncated_frac"]) == 0


def test_sampler_gap_metrics() -> None:
    d = make_batch(5)
    m = d["mask"] > 0
    gap = np.abs(d["logp"] - d["behaviour_logp"])[m]
    got = jax.jit(sampler_gap)(d["logp"], d["behaviour_logp"], d["mask"])
    assert float(got["monitor/sampler_gap_mean"]) == pytest.approx(gap.mean(), rel=1e-5)
    assert float(got["monitor/sampler_gap_max"]) == pytest.approx(gap.max(), rel=1e-6)
    # every loss reports it; without behaviour_logp, against old_logp (the sampler's then)
    (_, metrics), _ = compiled("ppo_clip", LossConfig())(as_inputs(d, behaviour_logp=None))
    old_gap = np.abs(d["logp"] - d["old_logp"])[m]
    assert float(metrics["monitor/sampler_gap_max"]) == pytest.approx(old_gap.max(), rel=1e-6)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="is_cap"):
        LossConfig(is_correction="token_tis", is_cap=1.0)
    with pytest.raises(ValueError, match="is_correction"):
        LossConfig(is_correction="sequence")  # type: ignore[arg-type]
    for bad in (dict(is_cap=0.5), dict(is_cap=float("inf")), dict(is_correction="tis")):
        with pytest.raises(ValueError):
            TrainConfig.flat(**bad)
    cfg = parse_args(
        TrainConfig, ["--is_correction", "seq_tis", "--vllm_importance_sampling_clip_max=3"]
    )
    assert cfg.algorithm.is_correction == "seq_tis" and cfg.algorithm.is_cap == 3.0
    assert cfg.algorithm.recomputes_logprobs  # a correction needs the proximal log-probs
    loss_cfg = cfg.algorithm.loss_config(max_tokens=8)
    assert (loss_cfg.is_correction, loss_cfg.is_cap) == ("seq_tis", 3.0)
    assert not TrainConfig.flat().algorithm.recomputes_logprobs
