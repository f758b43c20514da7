"""Training checkpoints: params, optimizer state and step, plus JSON metadata.

```
run_dir/checkpoints/
  100/
    state/      orbax (StandardSave) of the state pytree; typed PRNG keys stored as key data
    meta/       JSON: step, data_position, config, key implementations, extra
  200/ ...
  300.orbax-checkpoint-tmp-<time>/     a save in progress (or killed): never listed or read
```

Orbax writes each step into a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint intact and its half-written directory is
ignored. The last `max_to_keep` steps are kept.

    ckpt = TrainCheckpointer(run_dir / "checkpoints", max_to_keep=3, save_interval=50)
    ckpt.save(step, state, data_position=loader_position, config=asdict(train_config))
    ...
    restored = ckpt.restore(abstract_state=jax.eval_shape(init_state, ...))  # latest step
    state, position = restored.state, restored.data_position

`abstract_state` fixes the structure, dtypes and shardings of the restored arrays: give
`jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))` leaves (or real
arrays, whose shardings are reused) and every array is read straight onto its devices.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlmgym_train.jsonable import jsonable

PyTree = Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything an update step reads and writes (a pytree).

    step: int32[]        optimizer updates applied so far.
    params: pytree       the trained weights (fp32 master weights when training in mixed
                         precision; see `vlmgym_train.optim`).
    opt_state: pytree    `tx.init(params)`.

    No PRNG key: everything random in a step derives from (seed, step) (see
    `vlmgym_train.grpo`). Checkpoints of older versions, which stored one, still restore.
    """

    step: jax.Array
    params: PyTree
    opt_state: optax.OptState

    @classmethod
    def create(cls, params: PyTree, tx: optax.GradientTransformation) -> TrainState:
        """Step 0: `tx.init(params)`."""
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    def replace(self, **changes: Any) -> TrainState:
        """A copy with the given fields replaced."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def shardings(
        cls, tx: optax.GradientTransformation, params: PyTree, param_shardings: PyTree, mesh: Any
    ) -> TrainState:
        """Where each leaf of `create(params, tx)` lives: the params as `param_shardings`
        say, every optimizer statistic with a param's shape (AdamW's moments) like that
        param, everything else (counts, Adafactor's factored rows and columns) replicated.

        Left to XLA, a zeros-initialised optimizer state comes out replicated: with
        `--mesh_fsdp 8` every device would hold all of AdamW's moments.
        """
        from jax.sharding import NamedSharding, PartitionSpec
        from vlmgym_model import dotted_path

        replicated = NamedSharding(mesh, PartitionSpec())
        by_path = {
            dotted_path(p): (x.shape, sh)
            for (p, x), sh in zip(
                jax.tree_util.tree_flatten_with_path(params)[0],
                jax.tree.leaves(param_shardings),
                strict=True,
            )
        }
        state = jax.eval_shape(lambda p: cls.create(p, tx), params)

        def place(path: tuple[Any, ...], leaf: Any) -> Any:
            name = dotted_path(path)
            for param, (shape, sharding) in by_path.items():
                if (name == param or name.endswith("." + param)) and leaf.shape == shape:
                    return sharding
            return replicated

        opt = jax.tree_util.tree_map_with_path(place, state.opt_state)
        return cls(step=replicated, params=param_shardings, opt_state=opt)


@dataclasses.dataclass(frozen=True)
class RestoredCheckpoint:
    """What `TrainCheckpointer.restore` returns.

    step: the checkpoint's step; state: the restored pytree (structure of `abstract_state`);
    data_position, config, extra: the JSON given to `save` (None when not given).
    """

    step: int
    state: PyTree
    data_position: Any
    config: Any
    extra: Any


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _top_level(tree: Any) -> dict[str, Any] | None:
    """A dataclass's or a mapping's top-level entries by name (None for other pytrees)."""
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return {f.name: getattr(tree, f.name) for f in dataclasses.fields(tree)}
    if isinstance(tree, Mapping):
        return dict(tree)
    return None


def _path_name(path: tuple[Any, ...]) -> str:
    return jax.tree_util.keystr(path)


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    sharding = getattr(x, "sharding", None) if isinstance(x, jax.Array) else None
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def _key_data_abstract(x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    out = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    sharding = x.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        # The key data's trailing dimension (the key words) is replicated.
        sharding = jax.sharding.NamedSharding(sharding.mesh, sharding.spec)
    elif not isinstance(sharding, jax.sharding.SingleDeviceSharding):
        sharding = None
    return jax.ShapeDtypeStruct(out.shape, out.dtype, sharding=sharding)


class TrainCheckpointer:
    """Orbax `CheckpointManager` for training state: atomic saves, last N kept, resume.

    directory: where step directories go (created if missing; absolute paths are used).
    max_to_keep: how many of the newest checkpoints to keep (None keeps all).
    save_interval: `save` writes only when step % save_interval == 0, unless `force=True`
        (use it for the final step).
    async_save: write in a background thread after copying arrays to host (`wait()` blocks
        until done; `close()` waits). Off by default: a save is on disk when `save` returns.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        max_to_keep: int | None = 3,
        save_interval: int = 1,
        async_save: bool = False,
    ) -> None:
        import orbax.checkpoint as ocp

        if save_interval < 1:
            raise ValueError(f"save_interval must be >= 1, got {save_interval}")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        self.directory = Path(directory).absolute()
        self.save_interval = save_interval
        self._ocp = ocp
        # The interval is decided here (step % save_interval == 0); orbax's own policy would
        # also save the first step it sees.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` without `force` writes: step % save_interval == 0 and no
        checkpoint for `step` exists yet."""
        return step % self.save_interval == 0 and step not in self._manager.all_steps()

    def save(
        self,
        step: int,
        state: PyTree,
        *,
        data_position: Any = None,
        config: Any = None,
        extra: Any = None,
        force: bool = False,
    ) -> bool:
        """Write `state` (any pytree of arrays) as checkpoint `step`; True when written.

        data_position, config, extra: JSON-serialisable (a dataclass `config` is converted
        with `dataclasses.asdict`): the data iterator's position, the run's config, anything
        else. Typed PRNG keys in `state` are stored as `jax.random.key_data` and their
        implementation names in the metadata. Not written when the step is off the save
        interval (unless `force`) or already on disk.
        """
        ocp = self._ocp
        step = int(step)
        if step in self._manager.all_steps() or not (force or self.should_save(step)):
            return False
        flat, treedef = jax.tree_util.tree_flatten_with_path(state)
        key_impls: dict[str, str] = {}
        leaves = []
        for path, leaf in flat:
            if _is_key(leaf):
                key_impls[_path_name(path)] = str(jax.random.key_impl(leaf))
                leaves.append(jax.random.key_data(leaf))
            else:
                leaves.append(leaf)
        meta = {
            "step": step,
            "data_position": jsonable(data_position),
            "config": jsonable(config),
            "extra": jsonable(extra),
            "key_impls": key_impls,
        }
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(jax.tree.unflatten(treedef, leaves)),
            meta=ocp.args.JsonSave(meta),
        )
        try:
            return bool(self._manager.save(step, args=args, force=True))
        except (OSError, ValueError, RuntimeError) as err:
            raise _as_disk_full(err, self.directory / str(step)) from err

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON saved with checkpoint `step` (default: the latest), without its arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        restored = self._manager.restore(
            step, args=self._ocp.args.Composite(meta=self._ocp.args.JsonRestore())
        )
        return dict(restored.meta)

    def restore(self, step: int | None = None, *, abstract_state: PyTree) -> RestoredCheckpoint:
        """Read checkpoint `step` (default: the latest complete one) into `abstract_state`.

        abstract_state: a pytree with the saved structure whose leaves are
            `jax.ShapeDtypeStruct`s (with `sharding=` to place each array on a mesh) or
            arrays (their shape, dtype and sharding are used). Typed key leaves come back as
            typed keys. Raises FileNotFoundError when there is no checkpoint.
        """
        ocp = self._ocp
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}"
            )
        flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
        targets, key_paths = [], []
        for path, leaf in flat:
            sds = _abstract(leaf)
            if _is_key(sds):
                key_paths.append(_path_name(path))
                targets.append(_key_data_abstract(sds))
            else:
                key_paths.append(None)
                targets.append(sds)
        target = original = jax.tree.unflatten(treedef, targets)
        extra = self._extra_entries(step, target)
        if extra:  # read them too (orbax restores whole trees), then drop them
            target = {**(_top_level(target) or {}), **extra}
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                meta=ocp.args.JsonRestore(),
            ),
        )
        state = restored.state
        if extra:
            kept = {k: state[k] for k in _top_level(original) or {}}
            state = kept if isinstance(original, Mapping) else dataclasses.replace(original, **kept)
        meta: Mapping[str, Any] = restored.meta
        impls: Mapping[str, str] = meta.get("key_impls", {})
        leaves = []
        for name, leaf in zip(key_paths, jax.tree.leaves(state), strict=True):
            if name is None:
                leaves.append(leaf)
                continue
            if name not in impls:
                raise ValueError(
                    f"abstract_state has a PRNG key at {name}, but checkpoint {step} stored "
                    f"plain data there (keys stored at: {sorted(impls) or 'none'})"
                )
            leaves.append(jax.random.wrap_key_data(leaf, impl=impls[name]))
        return RestoredCheckpoint(
            step=int(step),
            state=jax.tree.unflatten(treedef, leaves),
            data_position=meta.get("data_position"),
            config=meta.get("config"),
            extra=meta.get("extra"),
        )

    def _extra_entries(self, step: int, target: Any) -> dict[str, jax.ShapeDtypeStruct]:
        """Top-level arrays of checkpoint `step`'s state that `target` lacks (an older
        TrainState's `rng`), as restore targets."""
        fields = _top_level(target)
        if fields is None:
            return {}
        try:
            on_disk = self._manager.item_metadata(step)["state"].tree
        except (AttributeError, KeyError, TypeError, ValueError):
            return {}
        if not isinstance(on_disk, Mapping):
            return {}
        return {
            k: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype)
            for k, m in on_disk.items()
            if k not in fields and hasattr(m, "shape") and hasattr(m, "dtype")
        }

    def wait(self) -> None:
        """Block until an asynchronous save has finished writing."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def complete_checkpoints(directory: str | Path) -> list[int]:
    """The steps of the complete checkpoints in `directory`, without opening a manager:
    orbax renames a step's folder to its bare number once it is written, so an interrupted
    save leaves only a temporary folder, which does not count."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def _as_disk_full(err: BaseException, path: Path) -> BaseException:
    """A full disk as the `OSError(ENOSPC)` it is: TensorStore, under orbax, reports it as
    a ValueError ("RESOURCE_EXHAUSTED ... No space left on device"). Other errors as they
    are."""
    text = str(err)
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return err
    if "No space left on device" in text or "os_error_code='28'" in text:
        return OSError(errno.ENOSPC, "No space left on device", str(path))
    return err
