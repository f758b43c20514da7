"""Policy losses against token-by-token numpy references written here, values and gradients."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from vlmgym_train import (
    LOSSES,
    LossConfig,
    LossInputs,
    aggregate,
    get_loss,
    kl_penalty,
    mask_truncated,
    overlong_penalty,
)

B, T = 4, 6
LENGTHS = [6, 3, 0, 1]  # row 2 is empty (a dropped completion)
ADV = np.array([1.0, -0.5, 2.0, -1.5], np.float32)


def make_batch(seed: int = 0, garbage: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.zeros((B, T), np.float32)
    for b, n in enumerate(LENGTHS):
        mask[b, :n] = 1.0
    logp = -rng.uniform(0.1, 3.0, (B, T)).astype(np.float32)
    old = (logp + rng.normal(0.0, 0.3, (B, T))).astype(np.float32)
    ref = (logp + rng.normal(0.0, 0.5, (B, T))).astype(np.float32)
    ent = rng.uniform(0.0, 2.0, (B, T)).astype(np.float32)
    if garbage:  # values no loss may look at
        off = mask == 0
        logp[off], old[off], ref[off], ent[off] = 40.0, -np.inf, np.nan, np.nan
    return dict(logp=logp, old_logp=old, ref_logp=ref, entropy=ent, mask=mask, advantages=ADV)


def inputs(d: dict[str, np.ndarray], **over: object) -> LossInputs:
    d = {**d, **over}
    return LossInputs(**{k: (None if v is None else jnp.asarray(v)) for k, v in d.items()})


# ----------------------------------------------------------------------------- references


def ref_aggregate(
    v: np.ndarray,
    m: np.ndarray,
    mode: str,
    max_tokens: int | None,
    rows: str = "nonempty",
    num_tokens: float | None = None,
) -> float:
    total = sum(float(v[b, t]) for b in range(v.shape[0]) for t in range(v.shape[1]) if m[b, t])
    if mode == "token_mean":
        return total / max(float(m.sum()) if num_tokens is None else num_tokens, 1.0)
    if mode == "constant":
        return total / (v.shape[0] * (max_tokens or v.shape[1]))
    if mode == "token_sum_norm":
        return total / (max_tokens or v.shape[1])
    per_seq = []
    for b in range(v.shape[0]):
        n = int(m[b].sum())
        if n or rows == "all":
            row_sum = sum(float(v[b, t]) for t in range(v.shape[1]) if m[b, t])
            per_seq.append(row_sum / max(n, 1) if mode == "seq_mean" else row_sum)
    return sum(per_seq) / max(len(per_seq), 1)


def ref_kl(logp: float, ref: float, est: str) -> float:
    if est == "k1":
        return logp - ref
    if est == "k2":
        return 0.5 * (logp - ref) ** 2
    return math.exp(ref - logp) - (ref - logp) - 1.0


def ref_ppo_tokens(d: dict[str, np.ndarray], low: float, high: float) -> tuple[np.ndarray, ...]:
    """Per-token loss and d(loss_token)/d(logp) of -min(r A, clip(r) A)."""
    pg, grad = np.zeros((B, T)), np.zeros((B, T))
    for b in range(B):
        a = float(d["advantages"][b])
        for t in range(T):
            if not d["mask"][b, t]:
                continue
            r = math.exp(float(d["logp"][b, t]) - float(d["old_logp"][b, t]))
            unclipped, clipped = -a * r, -a * min(max(r, 1 - low), 1 + high)
            pg[b, t] = max(unclipped, clipped)
            clipped_active = (r > 1 + high and a > 0) or (r < 1 - low and a < 0)
            grad[b, t] = 0.0 if clipped_active else -a * r
    return pg, grad


def token_weights(
    m: np.ndarray, mode: str, max_tokens: int | None, rows: str = "nonempty"
) -> np.ndarray:
    """d(aggregate)/d(value[b, t])."""
    w = np.zeros_like(m, dtype=np.float64)
    R = m.shape[0] if rows == "all" else sum(1 for b in range(m.shape[0]) if m[b].sum() > 0)
    for b in range(m.shape[0]):
        for t in range(m.shape[1]):
            if not m[b, t]:
                continue
            if mode == "token_mean":
                w[b, t] = 1.0 / m.sum()
            elif mode == "seq_mean":
                w[b, t] = 1.0 / (m[b].sum() * R)
            elif mode == "seq_sum":
                w[b, t] = 1.0 / R
            elif mode == "token_sum_norm":
                w[b, t] = 1.0 / (max_tokens or m.shape[1])
            else:
                w[b, t] = 1.0 / (m.shape[0] * (max_tokens or m.shape[1]))
    return w


@functools.cache
def compiled_loss(name: str, cfg: LossConfig):
    """jit(batch -> ((loss, metrics), (d loss / d logp, d loss / d entropy))), one per config."""
    fn = get_loss(name)

    @jax.jit
    def run(batch: LossInputs):
        def scalar(logp, entropy):
            return fn(dataclasses.replace(batch, logp=logp, entropy=entropy), cfg)

        return jax.value_and_grad(scalar, argnums=(0, 1), has_aux=True)(batch.logp, batch.entropy)

    return run


def loss_and_grads(name: str, batch: LossInputs, cfg: LossConfig):
    """(loss, metrics, d loss / d logp, d loss / d entropy)."""
    (loss, metrics), (g_logp, g_ent) = compiled_loss(name, cfg)(batch)
    return float(loss), metrics, np.asarray(g_logp), g_ent


# ----------------------------------------------------------------------------- tests


def test_registry() -> None:
    assert {"ppo_clip", "gspo", "reinforce"} <= set(LOSSES)
    with pytest.raises(KeyError, match="registered"):
        get_loss("ppo")


MODES = ["token_mean", "seq_mean", "seq_sum", "constant", "token_sum_norm"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("max_tokens", [None, 10])
@pytest.mark.parametrize("rows", ["nonempty", "all"])
def test_aggregate(mode: str, max_tokens: int | None, rows: str, tol: dict[str, float]) -> None:
    d = make_batch(1)
    v = d["logp"] * 3.0
    got = float(
        aggregate(
            jnp.asarray(v),
            jnp.asarray(d["mask"]),
            mode,
            max_tokens=max_tokens,
            seq_denominator=rows,
        )
    )
    want = ref_aggregate(v, d["mask"], mode, max_tokens, rows)
    assert got == pytest.approx(want, abs=tol["float32"])


def test_aggregate_seq_denominator_and_num_tokens(tol: dict[str, float]) -> None:
    d = make_batch(1)
    v, m = jnp.asarray(d["logp"]), jnp.asarray(d["mask"])
    for mode in ("seq_mean", "seq_sum"):  # one empty row of B = 4
        ne = float(aggregate(v, m, mode))
        assert float(aggregate(v, m, mode, seq_denominator="all")) == pytest.approx(ne * 3 / 4)
    token_mean = float(aggregate(v, m, "token_mean"))
    halved = float(aggregate(v, m, "token_mean", num_tokens=2.0 * sum(LENGTHS)))
    assert halved == pytest.approx(token_mean / 2, abs=tol["float32"])
    assert float(aggregate(v, m, "seq_mean", num_tokens=1.0)) == pytest.approx(
        float(aggregate(v, m, "seq_mean"))
    )  # num_tokens is token_mean's only


@pytest.mark.parametrize("mode", MODES)
def test_ppo_clip_values_and_grads(mode: str, tol: dict[str, float]) -> None:
    d = make_batch(2)
    rows = "all" if mode == "seq_sum" else "nonempty"
    cfg = LossConfig(
        clip_low=0.2, clip_high=0.28, aggregation=mode, max_tokens=8, seq_denominator=rows
    )
    loss, metrics, g, _ = loss_and_grads("ppo_clip", inputs(d, ref_logp=None), cfg)
    pg, dpg = ref_ppo_tokens(d, 0.2, 0.28)
    assert loss == pytest.approx(ref_aggregate(pg, d["mask"], mode, 8, rows), abs=tol["float32"])
    want_g = dpg * token_weights(d["mask"], mode, 8, rows)
    np.testing.assert_allclose(g, want_g, atol=tol["float32"])
    assert float(metrics["loss/pg"]) == pytest.approx(loss, abs=tol["float32"])
    assert float(metrics["tokens"]) == sum(LENGTHS)


def test_masked_tokens_have_no_effect_and_zero_grad(tol: dict[str, float]) -> None:
    cfg = LossConfig(kl_coef=0.1, entropy_coef=0.01, aggregation="seq_mean")
    for name in ("ppo_clip", "gspo", "reinforce"):
        clean = loss_and_grads(name, inputs(make_batch(3)), cfg)
        dirty = loss_and_grads(name, inputs(make_batch(3, garbage=True)), cfg)
        assert math.isfinite(dirty[0])
        assert dirty[0] == pytest.approx(clean[0], abs=tol["float32"]), name
        off = make_batch(3)["mask"] == 0
        assert np.all(dirty[2][off] == 0.0), name
        assert np.all(np.asarray(dirty[3])[off] == 0.0), name
        np.testing.assert_allclose(dirty[2], clean[2], atol=tol["float32"])
        for key, value in dirty[1].items():
            assert np.isfinite(float(value)), (name, key)


def test_clip_boundaries() -> None:
    """One token per row; ratios just inside and just outside each bound, for A = +1 and -1."""
    low, high, delta = 0.2, 0.28, 1e-3
    ratios = [1 - low - delta, 1 - low + delta, 1 + high - delta, 1 + high + delta]
    rows = [(r, a) for a in (1.0, -1.0) for r in ratios]
    n = len(rows)
    old = np.full((n, 1), -1.0, np.float32)
    logp = (old[:, 0] + np.log([r for r, _ in rows])).astype(np.float32)[:, None]
    d = dict(
        logp=logp,
        old_logp=old,
        mask=np.ones((n, 1), np.float32),
        advantages=np.array([a for _, a in rows], np.float32),
        ref_logp=None,
        entropy=None,
    )
    cfg = LossConfig(clip_low=low, clip_high=high)
    _, metrics, g, _ = loss_and_grads("ppo_clip", inputs(d), cfg)
    for i, (r, a) in enumerate(rows):
        clipped = (a > 0 and r > 1 + high) or (a < 0 and r < 1 - low)
        if clipped:
            assert g[i, 0] == 0.0, (r, a)
        else:
            assert g[i, 0] == pytest.approx(-a * r / n, rel=1e-4), (r, a)
    assert float(metrics["clip_frac/low"]) == pytest.approx(1 / n)
    assert float(metrics["clip_frac/high"]) == pytest.approx(1 / n)


def test_dual_clip_caps_negative_advantage_loss() -> None:
    d = dict(
        logp=np.log(np.array([[5.0], [5.0]], np.float32)),
        old_logp=np.zeros((2, 1), np.float32),
        mask=np.ones((2, 1), np.float32),
        advantages=np.array([-1.0, 1.0], np.float32),
        ref_logp=None,
        entropy=None,
    )
    loss, _, g, _ = loss_and_grads("ppo_clip", inputs(d), LossConfig(dual_clip=3.0))
    # A=-1: min(max(5, 1.2), 3) = 3, constant; A=+1: max(-5, -1.2) = -1.2, constant.
    assert loss == pytest.approx((3.0 - 1.2) / 2, rel=1e-5)
    np.testing.assert_array_equal(g, 0.0)
    loss_plain, _, g_plain, _ = loss_and_grads("ppo_clip", inputs(d), LossConfig())
    assert loss_plain == pytest.approx((5.0 - 1.2) / 2, rel=1e-5)
    assert g_plain[0, 0] == pytest.approx(5.0 / 2, rel=1e-5)


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_kl_estimators(est: str, tol: dict[str, float]) -> None:
    d = make_batch(4)
    got = np.asarray(kl_penalty(jnp.asarray(d["logp"]), jnp.asarray(d["ref_logp"]), est))
    want = np.vectorize(lambda lp, rf: ref_kl(lp, rf, est))(
        d["logp"].astype(np.float64), d["ref_logp"].astype(np.float64)
    )
    np.testing.assert_allclose(got, want, atol=tol["float32"], rtol=1e-5)
    if est != "k1":
        assert np.all(got >= 0)
    cfg0 = LossConfig(kl_estimator=est, aggregation="token_mean")
    cfg = LossConfig(kl_estimator=est, kl_coef=0.5, aggregation="token_mean")
    base, _, _, _ = loss_and_grads("ppo_clip", inputs(d, entropy=None), cfg0)
    loss, metrics, _, _ = loss_and_grads("ppo_clip", inputs(d, entropy=None), cfg)
    kl_agg = ref_aggregate(want, d["mask"], "token_mean", None)
    assert loss - base == pytest.approx(0.5 * kl_agg, abs=tol["float32"])
    assert float(metrics["kl/ref"]) == pytest.approx(kl_agg, abs=tol["float32"])


@pytest.mark.parametrize("name", ["ppo_clip", "reinforce"])
def test_kl_ratio_weights_k3_by_the_token_ratio(name: str, tol: dict[str, float]) -> None:
    """kl_ratio: kl_coef * agg(r * k3), r = exp(logp - old_logp), gradient through r too."""
    d = make_batch(13)
    zero_adv = dict(advantages=np.zeros(B, np.float32), entropy=None)  # only the KL term moves
    cfg = LossConfig(kl_coef=0.5, kl_ratio=True, aggregation="token_mean")
    loss, _, g, _ = loss_and_grads(name, inputs(d, **zero_adv), cfg)
    lp, old, ref = (d[k].astype(np.float64) for k in ("logp", "old_logp", "ref_logp"))
    r, e = np.exp(lp - old), np.exp(ref - lp)
    k3 = e - (ref - lp) - 1.0
    w = token_weights(d["mask"], "token_mean", None)
    assert loss == pytest.approx(0.5 * ref_aggregate(r * k3, d["mask"], "token_mean", None))
    # d/dlogp (r * k3) = r * k3 + r * (1 - e)
    np.testing.assert_allclose(g, 0.5 * w * (r * k3 + r * (1.0 - e)), atol=tol["float32"])
    plain, _, _, _ = loss_and_grads(
        name, inputs(d, **zero_adv), dataclasses.replace(cfg, kl_ratio=False)
    )
    assert abs(plain - loss) > 1e-3


def test_entropy_aggregation_token_mean(tol: dict[str, float]) -> None:
    d = make_batch(14)
    cfg = LossConfig(entropy_coef=0.1, aggregation="seq_mean", entropy_aggregation="token_mean")
    base, _, _, _ = loss_and_grads("ppo_clip", inputs(d), LossConfig(aggregation="seq_mean"))
    loss, _, _, g_ent = loss_and_grads("ppo_clip", inputs(d), cfg)
    ent_mean = ref_aggregate(d["entropy"], d["mask"], "token_mean", None)
    assert base - loss == pytest.approx(0.1 * ent_mean, abs=tol["float32"])
    want = -0.1 * token_weights(d["mask"], "token_mean", None)
    np.testing.assert_allclose(np.asarray(g_ent), want, atol=1e-7)


def test_k3_gradient_vanishes_at_reference() -> None:
    d = make_batch(5)
    d = {**d, "old_logp": d["logp"], "ref_logp": d["logp"], "advantages": np.zeros(B, np.float32)}
    _, metrics, g, _ = loss_and_grads("ppo_clip", inputs(d, entropy=None), LossConfig(kl_coef=1.0))
    np.testing.assert_array_equal(g, 0.0)
    assert float(metrics["kl/ref"]) == 0.0


def test_kl_and_entropy_need_inputs() -> None:
    d = make_batch(6)
    with pytest.raises(ValueError, match="ref_logp"):
        get_loss("ppo_clip")(inputs(d, ref_logp=None), LossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="entropy"):
        get_loss("ppo_clip")(inputs(d, entropy=None), LossConfig(entropy_coef=0.1))


def test_entropy_bonus(tol: dict[str, float]) -> None:
    d = make_batch(7)
    cfg = LossConfig(entropy_coef=0.01, aggregation="seq_mean")
    base, _, _, _ = loss_and_grads("ppo_clip", inputs(d), LossConfig(aggregation="seq_mean"))
    loss, metrics, _, g_ent = loss_and_grads("ppo_clip", inputs(d), cfg)
    assert base - loss == pytest.approx(
        0.01 * ref_aggregate(d["entropy"], d["mask"], "seq_mean", None), abs=tol["float32"]
    )
    np.testing.assert_allclose(
        np.asarray(g_ent), -0.01 * token_weights(d["mask"], "seq_mean", None), atol=1e-7
    )
    assert float(metrics["entropy"]) == pytest.approx(
        ref_aggregate(d["entropy"], d["mask"], "token_mean", None), abs=tol["float32"]
    )


def test_behaviour_metrics(tol: dict[str, float]) -> None:
    d = make_batch(8)
    _, metrics, _, _ = loss_and_grads("ppo_clip", inputs(d), LossConfig())
    lr = d["logp"].astype(np.float64) - d["old_logp"]
    assert float(metrics["ratio/mean"]) == pytest.approx(
        ref_aggregate(np.exp(lr), d["mask"], "token_mean", None), abs=tol["float32"]
    )
    assert float(metrics["approx_kl"]) == pytest.approx(
        ref_aggregate(np.exp(lr) - 1 - lr, d["mask"], "token_mean", None), abs=tol["float32"]
    )


def test_gspo_sequence_ratio(tol: dict[str, float]) -> None:
    d = make_batch(9)
    low, high = 0.05, 0.08
    # Row 0: mean log-ratio 0.5 (s = e^0.5, clipped for A > 0); the others barely move.
    d["old_logp"] = d["logp"] - 0.01
    d["old_logp"][0] = d["logp"][0] - np.array([0.2, 0.8, 0.5, 0.5, 0.6, 0.4], np.float32)
    cfg = LossConfig(clip_low=low, clip_high=high, aggregation="seq_mean")
    loss, metrics, g, _ = loss_and_grads("gspo", inputs(d, ref_logp=None, entropy=None), cfg)

    want_loss, seqs, want_g = 0.0, 0, np.zeros((B, T))
    ratios = []
    for b in range(B):
        n = LENGTHS[b]
        if n == 0:
            continue
        seqs += 1
        s = math.exp(sum(float(d["logp"][b, t] - d["old_logp"][b, t]) for t in range(n)) / n)
        ratios.append(s)
        a = float(ADV[b])
        want_loss += max(-a * s, -a * min(max(s, 1 - low), 1 + high))
        clipped = (a > 0 and s > 1 + high) or (a < 0 and s < 1 - low)
        for t in range(n):
            want_g[b, t] = 0.0 if clipped else -a * s / n
    assert ratios[0] == pytest.approx(math.exp(0.5), rel=1e-5)
    assert loss == pytest.approx(want_loss / seqs, abs=tol["float32"])
    np.testing.assert_allclose(g, want_g / seqs, atol=tol["float32"])
    assert np.all(g[0] == 0.0)  # the clipped sequence contributes no gradient
    assert float(metrics["ratio/seq_mean"]) == pytest.approx(np.mean(ratios), abs=tol["float32"])
    assert float(metrics["clip_frac/high"]) == pytest.approx(6 / sum(LENGTHS))


def test_reinforce_matches_ppo_on_policy(tol: dict[str, float]) -> None:
    d = make_batch(10)
    d["old_logp"] = d["logp"].copy()
    cfg = LossConfig(aggregation="token_mean")
    loss, _, g_rf, _ = loss_and_grads("reinforce", inputs(d, ref_logp=None), cfg)
    _, _, g_ppo, _ = loss_and_grads("ppo_clip", inputs(d, ref_logp=None), cfg)
    want = ref_aggregate(
        -ADV[:, None] * d["logp"].astype(np.float64), d["mask"], "token_mean", None
    )
    assert loss == pytest.approx(want, abs=tol["float32"])
    np.testing.assert_allclose(g_rf, g_ppo, atol=tol["float32"])


def test_dr_grpo_constant_normaliser(tol: dict[str, float]) -> None:
    d = make_batch(11)
    d["old_logp"] = d["logp"].copy()  # ratio 1: token loss is -A
    cfg = LossConfig(aggregation="constant", max_tokens=100)
    loss, _, _, _ = loss_and_grads("ppo_clip", inputs(d, ref_logp=None), cfg)
    want = sum(-float(ADV[b]) * LENGTHS[b] for b in range(B)) / (B * 100)
    assert loss == pytest.approx(want, abs=tol["float32"])


def test_loss_config_validation() -> None:
    with pytest.raises(ValueError, match="aggregation"):
        LossConfig(aggregation="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kl_estimator"):
        LossConfig(kl_estimator="k4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="clip_low"):
        LossConfig(clip_low=1.0)
    with pytest.raises(ValueError, match="dual_clip"):
        LossConfig(dual_clip=0.5)
    with pytest.raises(ValueError, match="seq_denominator"):
        LossConfig(seq_denominator="some")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="entropy_aggregation"):
        LossConfig(entropy_aggregation="seq")  # type: ignore[arg-type]


def test_shape_checks() -> None:
    d = make_batch(12)
    with pytest.raises(ValueError, match="advantages"):
        get_loss("ppo_clip")(inputs(d, advantages=np.zeros((B, 1))), LossConfig())
    with pytest.raises(ValueError, match="old_logp"):
        get_loss("ppo_clip")(inputs(d, old_logp=d["old_logp"][:, :3]), LossConfig())


def test_overlong_penalty() -> None:
    got = np.asarray(overlong_penalty([0, 6, 7, 8, 10, 12], max_len=10, buffer=4, penalty=1.0))
    np.testing.assert_allclose(got, [0.0, 0.0, -0.25, -0.5, -1.0, -1.0], atol=1e-7)
    half = np.asarray(overlong_penalty([9], max_len=10, buffer=4, penalty=0.5))
    np.testing.assert_allclose(half, [-0.375], atol=1e-7)
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty([1], max_len=10, buffer=0)


def test_truncation_mask() -> None:
    m = np.array([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
    cut = mask_truncated(m, np.array([False, False, True]))
    assert cut.dtype == m.dtype
    np.testing.assert_array_equal(np.asarray(cut), [[1, 1, 1, 0, 0], [0] * 5, [0] * 5])
    f = mask_truncated(np.ones((2, 2), np.float32), np.array([True, False]))
    np.testing.assert_array_equal(np.asarray(f), [[0, 0], [1, 1]])
