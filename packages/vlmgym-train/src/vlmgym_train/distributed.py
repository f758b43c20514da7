"""Multi-host plumbing: the process mesh, per-host model views, host gathers, placement.

How a multi-host step runs (every process runs the same Python program, SPMD):

    global mesh ("data", "fsdp", "tensor"): process p owns whole rows of the data axis, so
      the weights (sharded over fsdp x tensor, replicated over data) are complete on every
      host's devices
    -> rollouts: process p samples its share of the step's groups on its own devices, with
       `local_view(params)` (the host's shards of the global weights, no copy) and PRNG
       keys derived from the global group index, so the samples equal a one-process run's
    -> `allgather_arrays`: every process receives every other's rollouts (token ids,
       log-probs, rewards, images); from here on all processes hold the same global batch
    -> the update: host arrays are placed on the global mesh with `put`, rows sharded over
       ("data", "fsdp"), and one jitted step runs across all processes.

With one process every function here is the identity or a plain device_put, so the
single-host path is the same code.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from vlmgym_model import MESH_AXES

# Environment variables that mark a multi-process launch JAX can detect by itself
# (`jax.distributed.initialize()` with no arguments reads the rest from the cluster).
_CLUSTER_MARKERS = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> bool:
    """Start `jax.distributed` when asked to; True when this is a multi-process run.

    Explicit flags win. `auto=True` lets JAX read the cluster's environment (SLURM, Open
    MPI, Cloud TPU...) and is a no-op on a plain single machine.
    """
    if coordinator_address or num_processes:
        if not (coordinator_address and num_processes and process_id is not None):
            raise ValueError(
                "multi-host needs all of --coordinator_address, --num_processes and "
                f"--process_id (got {coordinator_address!r}, {num_processes!r}, {process_id!r})"
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id {process_id} is not in [0, {num_processes})")
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    elif auto and any(os.environ.get(k) for k in _CLUSTER_MARKERS):
        jax.distributed.initialize()
    return jax.process_count() > 1


def process_mesh(data: int, fsdp: int, tensor: int) -> Mesh:
    """The global `("data", "fsdp", "tensor")` mesh, each process owning whole data rows.

    One size may be -1 (the rest of the devices). With several processes, `data` must be a
    multiple of the process count and the mesh must use every device: each host then holds
    complete replicas of the weights, which its rollouts read without communication.
    """
    from vlmgym_model import make_mesh

    n_proc = jax.process_count()
    if n_proc == 1:
        return make_mesh(data, fsdp, tensor)
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) == 1:
        known = math.prod(s for s in sizes if s != -1)
        sizes[sizes.index(-1)] = len(devices) // max(known, 1)
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"a multi-host mesh must use all {len(devices)} devices of the {n_proc} "
            f"processes; got data={data} x fsdp={fsdp} x tensor={tensor}"
        )
    if sizes[0] % n_proc:
        raise ValueError(
            f"--mesh_data={sizes[0]} must be a multiple of the {n_proc} processes: each host "
            "holds whole replicas of the model (fsdp and tensor stay within a host)"
        )
    grid = np.asarray(devices, dtype=object).reshape(sizes)
    for row in grid.reshape(sizes[0], -1):
        if len({d.process_index for d in row}) != 1:
            raise ValueError(
                "the devices of one data row span several processes; every process must "
                "have the same number of devices"
            )
    auto = jax.sharding.AxisType.Auto
    return Mesh(grid, MESH_AXES, axis_types=(auto,) * 3)


def local_mesh(mesh: Mesh) -> Mesh:
    """The rows of `mesh` whose devices belong to this process (the mesh itself with one)."""
    if jax.process_count() == 1:
        return mesh
    me = jax.process_index()
    rows = [i for i in range(mesh.devices.shape[0]) if mesh.devices[i].flat[0].process_index == me]
    return Mesh(mesh.devices[rows], mesh.axis_names, axis_types=mesh.axis_types)


def local_view(tree: Any, mesh: Mesh) -> Any:
    """This host's complete copy of arrays replicated over the data axis, on `local_mesh`.

    No data moves: the new arrays are assembled from this process's own shards. Arrays
    sharded over "data" cannot be viewed locally (they are not complete on one host).
    """
    if jax.process_count() == 1:
        return tree
    lmesh = local_mesh(mesh)

    def view(x: Any) -> Any:
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        spec = x.sharding.spec if isinstance(x.sharding, NamedSharding) else PartitionSpec()
        if any("data" in ((a,) if isinstance(a, str) else (a or ())) for a in spec):
            raise ValueError(f"an array sharded over 'data' ({spec}) has no local copy")
        sharding = NamedSharding(lmesh, spec)
        shards = {s.device: s.data for s in x.addressable_shards}
        arrays = [shards[d] for d in sharding.addressable_devices_indices_map(x.shape)]
        return jax.make_array_from_single_device_arrays(x.shape, sharding, arrays)

    return jax.tree.map(view, tree)


def put(x: Any, mesh: Mesh, spec: PartitionSpec | None = None) -> jax.Array:
    """Place a host array, identical on every process, on `mesh` with `spec` (replicated
    by default)."""
    x = np.asarray(x)
    sharding = NamedSharding(mesh, spec if spec is not None else PartitionSpec())
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(x: Any) -> np.ndarray:
    """A global array's full value on every process (a collective when it spans hosts)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def allgather_bytes(payload: bytes) -> list[bytes]:
    """Every process's `payload`, in process order (all processes must call it)."""
    if jax.process_count() == 1:
        return [payload]
    from jax.experimental import multihost_utils

    sizes = np.asarray(multihost_utils.process_allgather(np.array([len(payload)], np.int64)))
    sizes = sizes.reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[: len(payload)] = np.frombuffer(payload, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(buf))
    return [gathered[p, : int(sizes[p])].tobytes() for p in range(len(sizes))]


def allgather_arrays(arrays: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Every process's dict of numpy arrays (any shapes and dtypes), in process order.

    Arrays travel as an in-memory `.npz`, read back with `allow_pickle=False`: object
    arrays are refused rather than unpickled.
    """
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    out = []
    for blob in allgather_bytes(buf.getvalue()):
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            out.append({k: npz[k] for k in npz.files})
    return out


def sync(name: str) -> None:
    """A barrier across processes (no-op with one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def share(tasks: Sequence[int]) -> tuple[list[int], int]:
    """This process's contiguous share of a step's tasks and the global index of its first."""
    n_proc, me = jax.process_count(), jax.process_index()
    if len(tasks) % n_proc:
        raise ValueError(f"{len(tasks)} tasks do not split evenly over {n_proc} processes")
    k = len(tasks) // n_proc
    return list(tasks[me * k : (me + 1) * k]), me * k
