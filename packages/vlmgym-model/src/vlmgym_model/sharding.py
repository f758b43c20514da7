"""Logical axes -> mesh axes: the one table that decides how every weight is laid out.

Every weight declares logical axes (`"embed"`, `"q_heads"`, `"mlp"`, `"vocab"`...). A
`ShardingRules` maps each logical axis to a mesh axis of `("data", "fsdp", "tensor")` (or to
none), and `ParamSpec`s turn into `NamedSharding`s through it. A dimension whose size the
mesh axis does not divide is replicated instead, so tiny test models shard on any mesh.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None

_DEFAULT_RULES: dict[str, MeshAxes] = {
    # activations
    "batch": ("data", "fsdp"),
    "sequence": None,
    # text decoder weights
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    # vision tower weights
    "vision_patch": None,
    "vision_positions": None,
    "vision_embed": "fsdp",
    "vision_qkv": None,
    "vision_heads": "tensor",
    "vision_mlp": "tensor",
    "merger_in": "fsdp",
    "merger_hidden": "tensor",
}


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Maps logical axis names to mesh axes. Unknown logical axes are an error."""

    rules: Mapping[str, MeshAxes] = dataclasses.field(
        default_factory=lambda: MappingProxyType(dict(_DEFAULT_RULES))
    )

    def __post_init__(self) -> None:
        for name, target in self.rules.items():
            targets = (target,) if isinstance(target, str) else (target or ())
            bad = [t for t in targets if t not in MESH_AXES]
            if bad:
                raise ValueError(
                    f"sharding rule {name!r} -> {target!r} names mesh axes {bad}; "
                    f"the mesh axes are {MESH_AXES}"
                )

    def replace(self, **updates: MeshAxes) -> ShardingRules:
        """A copy with some logical axes re-mapped, e.g. `rules.replace(vocab=None)`."""
        return ShardingRules(MappingProxyType({**self.rules, **updates}))

    def partition_spec(
        self,
        logical_axes: Sequence[str | None],
        shape: Sequence[int] | None = None,
        mesh: Mesh | None = None,
    ) -> PartitionSpec:
        """The PartitionSpec for an array with these logical axes.

        With `shape` and `mesh`, a dimension the mesh axes do not divide evenly is replicated,
        and a mesh axis is never used twice in one spec.
        """
        used: set[str] = set()
        out: list[MeshAxes] = []
        for i, axis in enumerate(logical_axes):
            if axis is None:
                out.append(None)
                continue
            if axis not in self.rules:
                raise KeyError(
                    f"logical axis {axis!r} has no sharding rule; known: {sorted(self.rules)}"
                )
            target = self.rules[axis]
            targets = (target,) if isinstance(target, str) else tuple(target or ())
            targets = tuple(t for t in targets if t not in used)
            if mesh is not None:
                targets = tuple(t for t in targets if mesh.shape.get(t, 1) > 1)
                if shape is not None and targets:
                    size = math.prod(mesh.shape[t] for t in targets)
                    if shape[i] % size:
                        targets = ()
            used.update(targets)
            if not targets:
                out.append(None)
            else:
                out.append(targets[0] if len(targets) == 1 else targets)
        return PartitionSpec(*out)

    def sharding(
        self, mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None
    ) -> NamedSharding:
        return NamedSharding(mesh, self.partition_spec(logical_axes, shape, mesh))


def make_mesh(
    data: int = 1,
    fsdp: int = -1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A `("data", "fsdp", "tensor")` mesh over `devices` (all devices by default).

    One of the sizes may be -1: it takes whatever devices remain. Without -1, a mesh
    smaller than the device count uses the first data * fsdp * tensor devices. The axes
    are Auto (XLA propagates shardings), not Explicit, which `jax.make_mesh` would
    otherwise default to.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis size may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"{len(devices)} devices do not split into data*fsdp*tensor with sizes {sizes}"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if -1 not in (data, fsdp, tensor) and math.prod(sizes) < len(devices):
        devices = devices[: math.prod(sizes)]
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} "
            f"devices, but {len(devices)} are available"
        )
    grid = np.asarray(devices, dtype=object).reshape(sizes)
    auto = jax.sharding.AxisType.Auto
    return Mesh(grid, MESH_AXES, axis_types=(auto, auto, auto))
