"""Optimizer: schedule values, frozen subtrees, weight-decay mask, casts, NaN guard."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from vlmgym_train import (
    OptimConfig,
    apply_if_finite,
    cast_for_compute,
    is_finite,
    make_optimizer,
    make_schedule,
    trainable_by_name,
)


def toy_params() -> dict[str, dict[str, jax.Array]]:
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return {
        "vision": {"w": jax.random.normal(k1, (3, 4)), "norm": jnp.ones((4,), jnp.bfloat16)},
        "vision_proj": {"w": jax.random.normal(k2, (4, 2))},
        "text": {"w": jax.random.normal(k3, (2, 2)), "b": jnp.zeros((2,))},
    }


def random_grads(params, seed: int):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    )


def test_warmup_cosine_values() -> None:
    cfg = OptimConfig(lr=1e-3, warmup_steps=4, schedule="cosine", total_steps=12, min_lr_ratio=0.1)
    sched = jax.jit(make_schedule(cfg))

    def want(step: int) -> float:
        if step < 4:
            return 1e-3 * (step + 1) / 4
        p = min(1.0, (step - 4) / 8)
        return 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    for step in [0, 1, 3, 4, 6, 8, 11, 12, 50]:
        assert float(sched(step)) == pytest.approx(want(step), rel=1e-5), step
    assert float(sched(8)) == pytest.approx(0.55e-3, rel=1e-5)
    assert float(sched(12)) == pytest.approx(1e-4, rel=1e-5)


def test_constant_schedule_with_and_without_warmup() -> None:
    flat = make_schedule(OptimConfig(lr=2e-5))
    assert [float(flat(s)) for s in (0, 7, 10_000)] == pytest.approx([2e-5] * 3)
    warm = make_schedule(OptimConfig(lr=2e-5, warmup_steps=2))
    assert [float(warm(s)) for s in (0, 1, 2, 99)] == pytest.approx([1e-5, 2e-5, 2e-5, 2e-5])


def test_schedule_drives_the_update() -> None:
    """Adam's first bias-corrected step is lr_0 * g / (|g| + eps) = lr / warmup here."""
    cfg = OptimConfig(lr=1e-2, warmup_steps=4, max_grad_norm=None, eps=1e-12)
    tx = make_optimizer(cfg)
    params = {"w": jnp.zeros((3,))}
    updates, _ = jax.jit(tx.update)({"w": jnp.array([1.0, -2.0, 0.5])}, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]), [-2.5e-3, 2.5e-3, -2.5e-3], rtol=1e-5)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="total_steps"):
        OptimConfig(schedule="cosine")
    with pytest.raises(ValueError, match="optimizer"):
        OptimConfig(optimizer="sgd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exceed"):
        OptimConfig(schedule="cosine", total_steps=5, warmup_steps=5)


def test_trainable_by_name() -> None:
    flags = trainable_by_name(toy_params(), frozen=["vision"])
    assert flags["vision"] == {"w": False, "norm": False}
    assert flags["vision_proj"] == {"w": True}  # a component boundary, not a prefix
    assert flags["text"] == {"w": True, "b": True}
    assert trainable_by_name(toy_params(), frozen=[r"text\.b"])["text"] == {"w": True, "b": False}


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
@pytest.mark.parametrize("as_callable", [False, True])
def test_frozen_subtree_gets_no_update_and_no_state(optimizer: str, as_callable: bool) -> None:
    params = toy_params()
    cfg = OptimConfig(optimizer=optimizer, lr=1e-2, weight_decay=0.1)
    if as_callable:
        tx = make_optimizer(cfg, trainable=lambda p: trainable_by_name(p, ["vision"]))
    else:
        tx = make_optimizer(cfg, params, trainable=trainable_by_name(params, ["vision"]))
    state = tx.init(params)

    @jax.jit
    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    new = params
    for i in range(3):
        new, state = step(new, state, random_grads(params, i))
    for name in ("w", "norm"):
        np.testing.assert_array_equal(np.asarray(new["vision"][name]), params["vision"][name])
        assert new["vision"][name].dtype == params["vision"][name].dtype
    assert not np.allclose(new["text"]["w"], params["text"]["w"])
    assert not np.allclose(new["vision_proj"]["w"], params["vision_proj"]["w"])
    # No optimizer state has the shape of a frozen leaf (12 = 3 * 4 elements of vision.w).
    state_sizes = [x.size for x in jax.tree.leaves(state)]
    assert 12 not in state_sizes
    if optimizer == "adamw":
        # mu and nu of the trainable leaves, plus scalar step counts
        assert sum(x.size for x in jax.tree.leaves(state) if x.ndim) == 2 * (8 + 4 + 2)


def test_structure_mismatch_is_reported() -> None:
    params = toy_params()
    with pytest.raises(ValueError, match="structure"):
        make_optimizer(OptimConfig(), params, trainable={"vision": False})


def test_weight_decay_only_on_matrices() -> None:
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    cfg = OptimConfig(lr=0.1, weight_decay=0.5, max_grad_norm=None)
    tx = make_optimizer(cfg)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(new["w"]), 1.0 - 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(new["b"]), 1.0)


def test_grad_clipping_bounds_the_norm() -> None:
    """With clipping at 1e-3 and a tiny eps, Adam's first step is unchanged (scale-free), but
    the second moment sees clipped gradients: check it directly."""
    cfg = OptimConfig(lr=1.0, max_grad_norm=1e-3)
    tx = make_optimizer(cfg)
    params = {"w": jnp.zeros((4,))}
    _, state = jax.jit(tx.update)({"w": jnp.full((4,), 10.0)}, tx.init(params), params)
    nu = [x for x in jax.tree.leaves(state) if x.shape == (4,)][-1]
    # clipped grads are 10 * 1e-3 / 20 = 5e-4 each; nu = (1 - b2) * g^2.
    np.testing.assert_allclose(np.asarray(nu), (1 - 0.999) * (5e-4) ** 2, rtol=1e-4)


def test_cast_for_compute_keeps_master_grads_fp32() -> None:
    params = {"w": jnp.full((3,), 1.5), "ids": jnp.arange(3), "key": jax.random.key(0)}
    cast = cast_for_compute(params, jnp.bfloat16)
    assert cast["w"].dtype == jnp.bfloat16
    assert cast["ids"].dtype == params["ids"].dtype
    assert cast["key"].dtype == params["key"].dtype

    def loss(w):
        return (cast_for_compute({"w": w}, jnp.bfloat16)["w"] ** 2).sum().astype(jnp.float32)

    g = jax.jit(jax.grad(loss))(params["w"])
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(g), 3.0)


def test_is_finite() -> None:
    grads = {"a": jnp.ones(3), "n": jnp.arange(2)}
    f = jax.jit(is_finite)
    assert bool(f(jnp.float32(1.0), grads))
    assert not bool(f(jnp.float32(jnp.nan), grads))
    assert not bool(f(jnp.float32(1.0), {**grads, "a": jnp.array([1.0, jnp.inf, 0.0])}))
    assert not bool(f(jnp.float32(1.0), {**grads, "a": jnp.array([1.0, -jnp.inf, 0.0])}))
    assert not bool(f(jnp.float32(1.0), {**grads, "a": jnp.array([jnp.nan, 0.0, 0.0])}))
    # Decided on the norm: a gradient whose square overflows float32 counts as not finite.
    assert not bool(f(jnp.float32(1.0), {**grads, "a": jnp.array([1e20, 0.0, 0.0])}))
    assert bool(f(jnp.float32(1.0), {**grads, "a": jnp.array([1e18, 0.0, 0.0])}))
    # A norm computed elsewhere is used as given.
    assert not bool(f(jnp.float32(1.0), grads, jnp.float32(jnp.nan)))


def test_apply_if_finite_skips_bad_steps() -> None:
    params = {"w": jnp.ones((3,))}
    tx = make_optimizer(OptimConfig(lr=0.1, warmup_steps=2))
    state = tx.init(params)
    step = jax.jit(lambda g, s, p, loss: apply_if_finite(tx, g, s, p, loss))
    bad = {"w": jnp.array([1.0, jnp.nan, 1.0])}
    p1, s1, ok = step(bad, state, params, jnp.float32(0.5))
    assert not bool(ok)
    np.testing.assert_array_equal(np.asarray(p1["w"]), 1.0)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    good = {"w": jnp.ones((3,))}
    p2, _, ok = step(good, s1, p1, jnp.float32(0.5))
    assert bool(ok)
    np.testing.assert_allclose(np.asarray(p2["w"]), 1.0 - 0.05, rtol=1e-5)  # lr / warmup
    _, _, ok = step(good, s1, p1, jnp.float32(jnp.inf))
    assert not bool(ok)


def test_stochastic_rounding_is_unbiased_and_lands_small_updates():
    from vlmgym_train.optim import apply_updates, stochastic_round

    x = jnp.full((200_000,), 1.0 + 2.0**-10, jnp.float32)  # 1/8 of a bf16 ulp above 1
    rounded = stochastic_round(x, jax.random.key(0)).astype(jnp.float32)
    assert set(np.unique(np.asarray(rounded))) == {1.0, 1.0 + 2.0**-7}
    assert abs(float(rounded.mean()) - float(x[0])) < 2e-5  # unbiased
    # 1e-4 updates on bf16 ones: to nearest they vanish, stochastically they accumulate
    params = {"w": jnp.ones((4096,), jnp.bfloat16)}
    updates = {"w": jnp.full((4096,), 1e-4, jnp.float32)}
    near = stoch = params
    for i in range(20):
        near = apply_updates(near, updates)
        stoch = apply_updates(stoch, updates, "stochastic", jax.random.key(i))
    assert float(near["w"].astype(jnp.float32).mean()) == 1.0
    assert abs(float(stoch["w"].astype(jnp.float32).mean()) - 1.002) < 3e-4
    assert stoch["w"].dtype == jnp.bfloat16
