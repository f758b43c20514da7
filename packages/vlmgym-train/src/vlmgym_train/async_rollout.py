"""Asynchronous rollouts: later steps sample while the current one trains.

    --max_staleness K    the batch of a later step is sampled in a background thread, with
                         params at most K updates old, while this step trains (0: sample,
                         then train: `grpo.grpo_step`, the same numbers bit for bit)
    --rollout_devices N  the last N devices sample, the others train; the params are
                         copied onto the N after each update (`time/param_copy_s`)

Notable:

- **The schedule is fixed, not raced.** The batch of step t is sampled with the params
  theta_v (the params after v steps), v(t) = max(t - K, c(t)), where c(t) is the last
  checkpoint step at or before t (a multiple of --save_interval, or the step resumed
  from). It is launched as soon as theta_v exists: right after the update of step v - 1.
  So every batch's staleness, t - v(t) <= K, is known in advance and logged
  (`async/staleness`); nothing depends on which thread is faster, and everything random
  still derives from (seed, step). With K = 0, v(t) = t: the synchronous run.
- **Checkpoints and --resume: no batch is in flight across a checkpoint.** The first K
  batches after a checkpoint step c are sampled with theta_c (staleness 0, 1, ..., K - 1):
  the trainer waits for the rollout once per --save_interval. In exchange a killed run
  resumed from its last checkpoint repeats the uninterrupted run exactly: the resumed
  run samples those batches with theta_c too. A checkpoint records where the first batch
  it has not trained began (the data order's position and the env's `state_dict` as they
  were before that batch was collected), so a batch already under way at the save is
  simply sampled again on resume. Changing --save_interval on resume moves the steps
  where the staleness restarts.
- **Long tails: neither partial rollouts nor a deadline.** A completion is bounded by
  --num_generation_tokens, so the longest completion bounds a batch's decoding (the
  sampler's decode loop stops when every sample has stopped). With K >= 1 that tail, and
  the env's reward computation, overlap the update of the step before instead of idling
  the trainer. Partial rollouts (finishing a completion in the next batch) would need the
  KV cache and the sampler's position carried across batches and a completion's tokens
  sampled under two policies; a deadline would drop the long completions, a bias toward
  short answers. Neither is done.
- **Threads.** One producer thread collects batches in step order (`collect_groups`, the
  env's `reset` and `step_many`, the data order's `take`); the trainer thread does
  everything else. The trainer reads the env only through `step_metrics` (the infos of
  its own batch) and `skipped` (a copy of counts); periodic evaluation builds its own env
  and may sample beside the producer (the `Sampler` holds no per-call state). On one set
  of devices, each in-flight batch holds its own copy of the params it was sampled with
  (the update donates the state's buffers): K copies at most.
- **One process only.** The producer gathers rollouts across processes (collectives)
  while the trainer's update runs its own; their order could differ between hosts, so
  K > 0 and --rollout_devices are refused in multi-process runs for now.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from vlmgym_model import make_mesh

from vlmgym_train import distributed
from vlmgym_train.checkpointing import TrainState
from vlmgym_train.config import TrainConfig
from vlmgym_train.grpo import Rollouts, StepSetup, collect_groups, grpo_step, train_on_rollouts


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """`spec` on `mesh`, each dimension the mesh's axes do not divide replicated instead."""
    out: list[Any] = []
    for dim, size in enumerate(shape):
        axes = spec[dim] if dim < len(spec) else None
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        ways = math.prod(mesh.shape[a] for a in names)
        out.append(axes if size % ways == 0 else None)
    return PartitionSpec(*out)


class RolloutDevices:
    """The devices that sample (--rollout_devices): a mesh of their own, with the fsdp
    axis over all of them, and the copy of the params onto it.

    Leaves that are not trained (LoRA's frozen base) are copied once and reused.
    """

    def __init__(self, devices: Sequence[jax.Device]) -> None:
        self.mesh = make_mesh(1, -1, 1, devices=devices)
        self._frozen: dict[int, tuple[jax.Array, jax.Array]] = {}

    def copy(self, params: Any, trained: Any) -> Any:
        """`params` (a pytree on the training mesh) on this mesh; `trained`: the state's
        params, the leaves that change every update."""
        fresh = {id(x) for x in jax.tree.leaves(trained)}

        def put(x: Any) -> Any:
            if not isinstance(x, jax.Array):
                return x
            if id(x) not in fresh and id(x) in self._frozen:
                return self._frozen[id(x)][1]
            spec = x.sharding.spec if isinstance(x.sharding, NamedSharding) else PartitionSpec()
            y = jax.device_put(x, NamedSharding(self.mesh, fit_spec(spec, x.shape, self.mesh)))
            if id(x) not in fresh:
                self._frozen[id(x)] = (x, y)  # x kept alive: its id stays its own
            return y

        return jax.tree.map(put, params)


def make_meshes(cfg: TrainConfig) -> tuple[Mesh, RolloutDevices | None]:
    """The training mesh, and the sampling devices when --rollout_devices is set (the
    last N devices; the mesh then spans the others)."""
    mesh_cfg, n = cfg.mesh, cfg.rollout.rollout_devices
    multi = jax.process_count() > 1
    if multi and (n or cfg.rollout.max_staleness):
        raise ValueError(
            "--max_staleness > 0 and --rollout_devices run in one process only (a rollout "
            "thread's gathers could interleave with the update's collectives across hosts)"
        )
    if not n:
        return distributed.process_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor), None
    devices = jax.devices()
    if n >= len(devices):
        raise ValueError(
            f"--rollout_devices {n} leaves none of the {len(devices)} devices to train on"
        )
    train = devices[: len(devices) - n]
    mesh = make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, devices=train)
    return mesh, RolloutDevices(devices[len(devices) - n :])


class StepRunner(Protocol):
    """What the `Trainer` runs its steps through: `SyncRollouts` or `AsyncRollouts`."""

    def step(self, state: TrainState, step: int) -> tuple[TrainState, dict]: ...

    def resume_point(self, step: int) -> tuple[int, dict[str, Any]]: ...

    def close(self) -> None: ...


class SyncRollouts:
    """Sample, then train (--max_staleness 0 on the training mesh): `grpo_step`."""

    def __init__(self, setup: StepSetup) -> None:
        self.setup = setup

    def step(self, state: TrainState, step: int) -> tuple[TrainState, dict]:
        """One step: `grpo.grpo_step`."""
        return grpo_step(self.setup, state, step)

    def resume_point(self, step: int) -> tuple[int, dict[str, Any]]:
        """The data order's position and the env's state a checkpoint at `step` records."""
        del step
        return self.setup.data.position, self.setup.env.state_dict()

    def close(self) -> None:
        """Nothing to stop."""


@dataclasses.dataclass
class _Launched:
    version: int  # the step whose params sample the batch
    future: Future[Rollouts]


class AsyncRollouts:
    """Steps whose batches a background thread samples ahead (see the module docstring).

    setup: the run's `StepSetup`; rollout_params: the params the sampler reads, from a
    state (`Trainer.rollout_params`); devices: where to sample (None: the training mesh).
    """

    def __init__(
        self,
        setup: StepSetup,
        *,
        max_staleness: int,
        save_interval: int,
        total_steps: int,
        rollout_params: Callable[[TrainState], Any],
        devices: RolloutDevices | None = None,
    ) -> None:
        self.setup, self.max_staleness = setup, max_staleness
        self.save_interval, self.total_steps = save_interval, total_steps
        self.rollout_params, self.devices = rollout_params, devices
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmgym-rollout")
        self._launched: dict[int, _Launched] = {}
        self._lock = threading.Lock()  # guards the snapshots and the producer's start
        self._snapshots: dict[int, tuple[int, dict[str, Any]]] = {}
        self._start: int | None = None  # the first step this process trains
        self._next = 0  # the next step to launch

    def version(self, step: int) -> int:
        """The step whose params sample the batch of `step`: max(step - K, c(step))."""
        assert self._start is not None
        checkpoint = max(self._start, step // self.save_interval * self.save_interval)
        return max(step - self.max_staleness, checkpoint)

    def step(self, state: TrainState, step: int) -> tuple[TrainState, dict]:
        """Wait for the batch of `step`, train on it, then launch the batches the new
        params sample. Logs `async/staleness`, `async/collect_s` (the producer's time on
        the batch), `time/wait_rollout_s` and `time/param_copy_s` (the copy that followed
        the update, not counted in `time/step_s`)."""
        t0 = time.perf_counter()
        copy_s = 0.0
        if self._start is None:
            self._start = self._next = step
            copy_s = self._launch(state, step)
        launched = self._launched.pop(step)
        rollouts = launched.future.result()
        rollouts.staleness = step - launched.version
        rollouts.stats["async/staleness"] = float(rollouts.staleness)
        rollouts.stats["time/wait_rollout_s"] = time.perf_counter() - t0
        state, metrics = train_on_rollouts(self.setup, state, rollouts, step, t0)
        metrics["time/param_copy_s"] = copy_s + self._launch(state, step + 1)
        return state, metrics

    def _launch(self, state: TrainState, version: int) -> float:
        """Submit every batch sampled with `state`'s params (those of step `version`);
        returns the seconds the params took to copy."""
        steps = []
        while self._next < self.total_steps and self.version(self._next) <= version:
            assert self.version(self._next) == version, "a batch missed its params"
            steps.append(self._next)
            self._next += 1
        if not steps:
            return 0.0
        t0 = time.perf_counter()
        params = self.rollout_params(state)
        if self.devices is not None:
            params = self.devices.copy(params, state.params)
        elif self.max_staleness > 0:  # the update donates the state: sample from a copy
            owned = {id(x) for x in jax.tree.leaves(state.params)}
            params = jax.tree.map(lambda x: jnp.copy(x) if id(x) in owned else x, params)
        params = jax.block_until_ready(params)
        copy_s = time.perf_counter() - t0
        for step in steps:
            future = self._pool.submit(self._collect, params, step)
            self._launched[step] = _Launched(version, future)
        return copy_s

    def _collect(self, params: Any, step: int) -> Rollouts:
        """The producer thread's job: the batch of `step`, after noting where it began."""
        with self._lock:
            env_state = copy.deepcopy(self.setup.env.state_dict())
            self._snapshots[step] = (self.setup.data.position, env_state)
        t0 = time.perf_counter()
        rollouts = collect_groups(self.setup, params, step)
        rollouts.stats["async/collect_s"] = time.perf_counter() - t0
        return rollouts

    def resume_point(self, step: int) -> tuple[int, dict[str, Any]]:
        """The data order's position and the env's state before the batch of `step` was
        collected: what a checkpoint after `step` steps records.

        Batches before `step` were trained (so collected); when the batch of `step` has
        not begun, the producer is idle and the live values are those.
        """
        with self._lock:
            for old in [s for s in self._snapshots if s < step]:
                del self._snapshots[old]
            if step in self._snapshots:
                return self._snapshots[step]
            return self.setup.data.position, self.setup.env.state_dict()

    def close(self) -> None:
        """Stop the producer: batches not begun are dropped, a running one is finished."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._launched.clear()


def make_step_runner(
    cfg: TrainConfig,
    setup: StepSetup,
    rollout_params: Callable[[TrainState], Any],
    devices: RolloutDevices | None,
) -> StepRunner:
    """`SyncRollouts` for --max_staleness 0 on the training mesh, else `AsyncRollouts`."""
    if cfg.rollout.max_staleness == 0 and devices is None:
        return SyncRollouts(setup)
    return AsyncRollouts(
        setup,
        max_staleness=cfg.rollout.max_staleness,
        save_interval=cfg.run.save_interval,
        total_steps=cfg.run.total_steps,
        rollout_params=rollout_params,
        devices=devices,
    )
