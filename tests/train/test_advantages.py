"""Advantage estimators against loop-by-loop numpy references written here."""

from __future__ import annotations

import numpy as np
import pytest
from vlmgym_train import ADVANTAGES, dynamic_sampling_mask, get_advantage, register_advantage
from vlmgym_train.config import TrainConfig

REWARDS = np.array(
    [
        [1.0, 0.0, 0.0, 1.0],  # mixed
        [0.5, 0.5, 0.5, 0.5],  # all equal: no signal
        [0.0, 0.2, 0.9, 3.0],  # spread
    ],
    dtype=np.float32,
)
EPS = 1e-6


def ref_std(values: list[float], ddof: int) -> float:
    mean = sum(values) / len(values)
    return float(np.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - ddof)))


def ref_grpo(r: np.ndarray, ddof: int = 0, scale: str = "group") -> np.ndarray:
    out = np.zeros_like(r, dtype=np.float64)
    batch_std = ref_std([float(x) for x in r.ravel()], ddof)
    for g in range(r.shape[0]):
        row = r[g].astype(np.float64)
        mean = sum(row) / len(row)
        std = {"group": ref_std(list(row), ddof), "batch": batch_std, "none": None}[scale]
        out[g] = [(x - mean) if std is None else (x - mean) / (std + EPS) for x in row]
    return out


def ref_rloo(r: np.ndarray) -> np.ndarray:
    out = np.zeros_like(r, dtype=np.float64)
    G, n = r.shape
    for g in range(G):
        for i in range(n):
            others = [r[g, j] for j in range(n) if j != i]
            out[g, i] = r[g, i] - sum(others) / len(others)
    return out


def test_registry_lists_builtins_and_rejects_unknown() -> None:
    assert {"grpo", "dr_grpo", "rloo", "reinforce", "reinforce_plus_plus"} <= set(ADVANTAGES)
    assert get_advantage("GRPO") is ADVANTAGES["grpo"]
    with pytest.raises(KeyError, match="registered"):
        get_advantage("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_advantage("grpo")(lambda r, *, eps=1e-6: r)


def test_register_custom_estimator() -> None:
    @register_advantage("test_identity_adv")
    def identity(rewards, *, eps=1e-6):
        return rewards

    try:
        assert get_advantage("test_identity_adv") is identity
    finally:
        del ADVANTAGES["test_identity_adv"]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("ddof", [0, 1])
def test_grpo(ddof: int, scale: str, tol: dict[str, float]) -> None:
    got = np.asarray(get_advantage("grpo")(REWARDS, eps=EPS, ddof=ddof, scale=scale))
    np.testing.assert_allclose(got, ref_grpo(REWARDS, ddof, scale), atol=tol["float32"])
    assert np.all(got[1] == 0.0)  # equal rewards: zero advantage, not nan


def test_grpo_scale_none_is_dr_grpo_and_bad_options_raise() -> None:
    none = np.asarray(get_advantage("grpo")(REWARDS, scale="none"))
    np.testing.assert_array_equal(none, np.asarray(get_advantage("dr_grpo")(REWARDS)))
    with pytest.raises(ValueError, match="scale must be one of"):
        get_advantage("grpo")(REWARDS, scale="global")
    with pytest.raises(ValueError, match="ddof"):
        get_advantage("grpo")(np.ones((2, 1), np.float32), ddof=1)


# Equal rewards whose float32 mean is not exactly their value (0.1 * 3, 1/3 * 5, ...).
EQUAL_GROUPS = [[0.1] * 3, [1 / 3] * 5, [1e7 + 0.1] * 4, [-0.7] * 16, [3.3] * 7, [0.3] * 6]
ESTIMATORS = [
    ("grpo", {}),
    ("grpo", dict(ddof=1, eps=1e-4)),
    ("grpo", dict(scale="batch")),
    ("grpo", dict(scale="none")),
    ("dr_grpo", {}),
    ("rloo", {}),
    ("reinforce_plus_plus", dict(group_baseline=True)),
]


@pytest.mark.parametrize("values", EQUAL_GROUPS, ids=lambda v: f"{v[0]:.3g}x{len(v)}")
def test_equal_rewards_give_exactly_zero(values: list[float]) -> None:
    n = len(values)
    r = np.array([values, [0.0] * (n - 1) + [1.0]], np.float32)  # + a group with signal
    for name, kwargs in ESTIMATORS:
        got = np.asarray(get_advantage(name)(r, **kwargs))
        assert np.all(got[0] == 0.0), (name, kwargs, got[0])
        assert np.all(got[1] != 0.0), (name, kwargs)
    for name in ("reinforce", "reinforce_plus_plus"):  # batch baselines: a batch of equal rewards
        assert np.all(np.asarray(get_advantage(name)(r[:1])) == 0.0), name


def test_config_passes_std_options_to_estimators_that_take_them() -> None:
    cfg = TrainConfig.flat(scale_rewards="batch", std_ddof=1, std_eps=1e-4)
    assert cfg.algorithm.advantage_kwargs == {"eps": 1e-4, "ddof": 1, "scale": "batch"}
    assert TrainConfig.flat(advantage="rloo").algorithm.advantage_kwargs == {"eps": 1e-6}
    assert TrainConfig.flat(
        advantage="reinforce_plus_plus", std_ddof=1
    ).algorithm.advantage_kwargs == {
        "eps": 1e-6,
        "ddof": 1,
    }
    with pytest.raises(ValueError, match="scale_rewards applies to --advantage grpo"):
        TrainConfig.flat(advantage="rloo", scale_rewards="none")
    with pytest.raises(ValueError, match="divides by no std"):
        TrainConfig.flat(advantage="dr_grpo", std_ddof=1)
    with pytest.raises(ValueError, match="std_ddof must be 0 or 1"):
        TrainConfig.flat(std_ddof=2)
    with pytest.raises(ValueError, match="std_eps"):
        TrainConfig.flat(std_eps=-1.0)
    with pytest.raises(ValueError, match="scale_rewards"):
        TrainConfig.flat(scale_rewards="global")


def test_config_rejects_bad_loss_flags() -> None:
    with pytest.raises(ValueError, match="--aggregation"):
        TrainConfig.flat(aggregation="mean")
    with pytest.raises(ValueError, match="--dual_clip"):
        TrainConfig.flat(dual_clip=1.0)
    with pytest.raises(ValueError, match="--seq_denominator"):
        TrainConfig.flat(seq_denominator="some")
    with pytest.raises(ValueError, match="--token_normaliser"):
        TrainConfig.flat(token_normaliser="global")
    with pytest.raises(ValueError, match="--entropy_aggregation"):
        TrainConfig.flat(entropy_aggregation="seq")


def test_dr_grpo(tol: dict[str, float]) -> None:
    got = np.asarray(get_advantage("dr_grpo")(REWARDS))
    want = np.array([[r - np.mean(row) for r in row] for row in REWARDS.astype(np.float64)])
    np.testing.assert_allclose(got, want, atol=tol["float32"])


def test_rloo(tol: dict[str, float]) -> None:
    got = np.asarray(get_advantage("rloo")(REWARDS))
    np.testing.assert_allclose(got, ref_rloo(REWARDS), atol=tol["float32"])
    with pytest.raises(ValueError, match="at least 2"):
        get_advantage("rloo")(np.ones((3, 1)))


def test_reinforce_batch_baseline(tol: dict[str, float]) -> None:
    got = np.asarray(get_advantage("reinforce")(REWARDS))
    batch_mean = REWARDS.astype(np.float64).sum() / REWARDS.size
    np.testing.assert_allclose(got, REWARDS - batch_mean, atol=tol["float32"])
    raw = np.asarray(get_advantage("reinforce")(REWARDS, baseline=False))
    np.testing.assert_array_equal(raw, REWARDS)


def test_reinforce_plus_plus(tol: dict[str, float]) -> None:
    r = REWARDS.astype(np.float64)
    flat = r.ravel()
    want = (r - flat.mean()) / (np.sqrt(((flat - flat.mean()) ** 2).mean()) + EPS)
    got = np.asarray(get_advantage("reinforce_plus_plus")(REWARDS))
    np.testing.assert_allclose(got, want, atol=tol["float32"])
    want_1 = (r - flat.mean()) / (ref_std(list(flat), 1) + EPS)
    got_1 = np.asarray(get_advantage("reinforce_plus_plus")(REWARDS, ddof=1))
    np.testing.assert_allclose(got_1, want_1, atol=tol["float32"])
    c = r - r.mean(axis=1, keepdims=True)
    want_b = c / (np.sqrt((c**2).mean() - c.mean() ** 2) + EPS)
    got_b = np.asarray(get_advantage("reinforce_plus_plus")(REWARDS, group_baseline=True))
    np.testing.assert_allclose(got_b, want_b, atol=tol["float32"])


def test_estimators_reject_flat_rewards() -> None:
    with pytest.raises(ValueError, match=r"float\[G, n\]"):
        get_advantage("grpo")(np.ones(8))


def test_dynamic_sampling_mask() -> None:
    keep = np.asarray(dynamic_sampling_mask(REWARDS))
    assert keep.dtype == np.bool_
    np.testing.assert_array_equal(keep, [True, False, True])
    np.testing.assert_array_equal(
        np.asarray(dynamic_sampling_mask(np.zeros((2, 3)))), [False, False]
    )
    near = np.array([[1.0, 1.0000005, 1.0]], dtype=np.float32)
    assert bool(dynamic_sampling_mask(near)[0])
    assert not bool(dynamic_sampling_mask(near, atol=1e-6)[0])


def test_discount_turns_credits_later_turns_more():
    from vlmgym_train.advantages import discount_turns

    # trajectory 0: three turns (rows 0, 2, 3), trajectory 1: one turn (row 1)
    adv = np.array([2.0, -1.0, 2.0, 2.0], np.float32)
    owner = np.array([0, 1, 0, 0])
    np.testing.assert_allclose(discount_turns(adv, owner, 0.5), [0.5, -1.0, 1.0, 2.0])
    np.testing.assert_array_equal(discount_turns(adv, owner, 1.0), adv)
