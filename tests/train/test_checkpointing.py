"""Training checkpoints: round trip, rotation, save interval, torn saves, shardings, resume."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from vlmgym_train import (
    OptimConfig,
    TrainCheckpointer,
    TrainState,
    make_optimizer,
    trainable_by_name,
)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    lr: float = 1e-3
    env_name: str = "shapes"


def make_state(seed: int = 0) -> tuple[TrainState, optax.GradientTransformation]:
    k = jax.random.split(jax.random.key(seed), 3)
    params = {
        "vision": {"w": jax.random.normal(k[0], (4, 3))},
        "text": {"w": jax.random.normal(k[1], (3, 5)), "b": jnp.zeros((5,), jnp.bfloat16)},
    }
    tx = make_optimizer(
        OptimConfig(lr=1e-2, warmup_steps=2), trainable=trainable_by_name(params, ["vision"])
    )
    return TrainState.create(params, tx), tx


def make_update(tx: optax.GradientTransformation):
    @jax.jit
    def update(state: TrainState) -> TrainState:
        sub = jax.random.fold_in(jax.random.key(7), state.step)
        grads = jax.tree.map(
            lambda p: jax.random.normal(sub, p.shape, jnp.float32).astype(p.dtype), state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return TrainState(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
        )

    return update


def assert_trees_equal(a, b) -> None:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert y.dtype == x.dtype
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_with_metadata(tmp_path: Path) -> None:
    state, tx = make_state()
    state = make_update(tx)(state)
    position = {"epoch": 1, "index": 17}
    with TrainCheckpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(1, state, data_position=position, config=RunConfig(), extra={"a": [1]})
        assert ckpt.latest_step() == 1
    with TrainCheckpointer(tmp_path / "ckpt") as ckpt:
        restored = ckpt.restore(abstract_state=jax.eval_shape(lambda: make_state(1)[0]))
    assert restored.step == 1
    assert restored.data_position == position
    assert restored.config == {"lr": 1e-3, "env_name": "shapes"}
    assert restored.extra == {"a": [1]}
    assert isinstance(restored.state, TrainState)
    assert_trees_equal(restored.state, state)


def test_restore_continues_exactly(tmp_path: Path) -> None:
    state, tx = make_state()
    update = make_update(tx)
    state = update(update(state))
    with TrainCheckpointer(tmp_path) as ckpt:
        ckpt.save(2, state)
        # Concrete arrays work as the abstract state too.
        resumed = ckpt.restore(2, abstract_state=make_state(5)[0]).state
    assert_trees_equal(update(update(resumed)), update(update(state)))


def test_keeps_last_n_and_honours_interval(tmp_path: Path) -> None:
    state, _ = make_state()
    with TrainCheckpointer(tmp_path, max_to_keep=2, save_interval=2) as ckpt:
        written = [ckpt.save(s, state.replace(step=jnp.int32(s))) for s in range(1, 7)]
        assert written == [False, True, False, True, False, True]
        assert ckpt.should_save(8) and not ckpt.should_save(7)
        assert ckpt.save(7, state, force=True)
        assert ckpt.all_steps() == [6, 7]
        with pytest.raises(FileNotFoundError, match="have"):
            ckpt.restore(2, abstract_state=state)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["6", "7"]


def test_partial_checkpoint_is_ignored(tmp_path: Path) -> None:
    state, _ = make_state()
    with TrainCheckpointer(tmp_path) as ckpt:
        ckpt.save(3, state)
    torn = tmp_path / "9.orbax-checkpoint-tmp-1700000000"
    (torn / "state").mkdir(parents=True)
    (torn / "state" / "garbage").write_bytes(b"\x00half-written")
    with TrainCheckpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 3
        assert ckpt.all_steps() == [3]
        restored = ckpt.restore(abstract_state=state)
    assert restored.step == 3
    assert_trees_equal(restored.state, state)


def test_empty_directory_raises(tmp_path: Path) -> None:
    with (
        TrainCheckpointer(tmp_path) as ckpt,
        pytest.raises(FileNotFoundError, match="no complete checkpoint"),
    ):
        ckpt.restore(abstract_state=make_state()[0])


def test_restore_onto_shardings(tmp_path: Path) -> None:
    state, _ = make_state()
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    rows = NamedSharding(mesh, PartitionSpec("data"))

    def abstract(x):
        sharding = rows if x.ndim == 2 else replicated
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    target = jax.tree.map(abstract, jax.eval_shape(lambda: state))
    with TrainCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
        restored = ckpt.restore(abstract_state=target).state
    assert restored.params["text"]["w"].sharding == rows
    assert restored.params["text"]["b"].sharding == replicated
    assert restored.step.sharding == replicated
    assert_trees_equal(restored, state)


def test_key_where_data_was_saved_is_an_error(tmp_path: Path) -> None:
    with TrainCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, {"rng": jnp.zeros((2,), jnp.uint32)})
        with pytest.raises(ValueError, match="PRNG key"):
            ckpt.restore(abstract_state={"rng": jax.random.key(0)})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _StateWithKey:
    """TrainState as versions before 0.2 saved it: with a PRNG key nothing read."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def test_checkpoints_with_the_old_rng_entry_restore(tmp_path: Path) -> None:
    state, _ = make_state()
    old = _StateWithKey(state.step + 3, state.params, state.opt_state, jax.random.key(5))
    with TrainCheckpointer(tmp_path) as ckpt:
        ckpt.save(3, old, data_position=17)
        restored = ckpt.restore(abstract_state=jax.eval_shape(lambda: state))
    assert isinstance(restored.state, TrainState) and restored.data_position == 17
    assert int(restored.state.step) == 3
    assert_trees_equal(restored.state.params, state.params)
    assert_trees_equal(restored.state.opt_state, state.opt_state)
    # and a typed key kept in a state of one's own still round-trips
    with TrainCheckpointer(tmp_path / "keys") as ckpt:
        ckpt.save(1, old)
        back = ckpt.restore(abstract_state=jax.eval_shape(lambda: old)).state
    assert_trees_equal(back, old)
