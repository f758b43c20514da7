"""Advantage estimators against loop-by-loop numpy references written here."""

from __future__ import annotations

import numpy as np
import pytest
from vlmgym_train import ADVANTAGES, dynamic_sampling_mask, get_advantage, register_advantage

REWARDS = np.array(
    [
        [1.0, 0.0, 0.0, 1.0],  # mixed
        [0.5, 0.5, 0.5, 0.5],  # all equal: no signal
        [0.0, 0.2, 0.9, 3.0],  # spread
    ],
    dtype=np.float32,
)
EPS = 1e-6


def ref_grpo(r: np.ndarray, ddof: int = 0) -> np.ndarray:
    out = np.zeros_like(r, dtype=np.float64)
    for g in range(r.shape[0]):
        row = r[g].astype(np.float64)
        n = len(row)
        mean = sum(row) / n
        std = np.sqrt(sum((x - mean) ** 2 for x in row) / (n - ddof))
        out[g] = [(x - mean) / (std + EPS) for x in row]
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


@pytest.mark.parametrize("ddof", [0, 1])
def test_grpo(ddof: int, tol: dict[str, float]) -> None:
    got = np.asarray(get_advantage("grpo")(REWARDS, eps=EPS, ddof=ddof))
    np.testing.assert_allclose(got, ref_grpo(REWARDS, ddof), atol=tol["float32"])
    assert np.all(got[1] == 0.0)  # equal rewards: zero advantage, not nan


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
