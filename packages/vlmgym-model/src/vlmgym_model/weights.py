"""Weights as pytrees of arrays whose leaves are described by `ParamSpec`s.

A model describes its weights once, as a pytree of `ParamSpec` (shape, logical axes, how to
initialise). Everything else derives from that tree: random init, abstract shapes for
compile-only analysis, shardings, and the checkpoint converter's shape checks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from vlmgym_model.sharding import ShardingRules

Init = Literal["normal", "zeros", "ones"]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One weight: its shape, a logical axis name per dimension, and its initialiser.

    `ParamSpec` is deliberately not a pytree node, so it is a leaf in a spec tree.
    """

    shape: tuple[int, ...]
    logical_axes: tuple[str | None, ...]
    init: Init = "normal"

    def __post_init__(self) -> None:
        if len(self.shape) != len(self.logical_axes):
            raise ValueError(
                f"ParamSpec shape {self.shape} has {len(self.shape)} dims but "
                f"{len(self.logical_axes)} logical axes {self.logical_axes}"
            )


def dotted_path(path: tuple[Any, ...]) -> str:
    """A pytree key path as the checkpoints spell it: "text.layers.q_proj"."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        else:
            parts.append(str(key))
    return ".".join(parts)


def is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def init_params(specs: Any, key: jax.Array, dtype: Any = jnp.float32, scale: float = 0.02) -> Any:
    """Random weights for a spec tree: normal(0, scale) matrices, unit norms, zero biases."""
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    keys = jax.random.split(key, len(leaves))
    out = []
    for spec, k in zip(leaves, keys, strict=True):
        if spec.init == "zeros":
            out.append(jnp.zeros(spec.shape, dtype))
        elif spec.init == "ones":
            out.append(jnp.ones(spec.shape, dtype))
        else:
            out.append((scale * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(treedef, out)


def abstract_params(
    specs: Any,
    dtype: Any = jnp.bfloat16,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
) -> Any:
    """`jax.ShapeDtypeStruct`s for a spec tree (sharded when a mesh is given): no memory."""
    shardings = param_shardings(specs, mesh, rules) if mesh is not None else None

    def one(spec: ParamSpec, sharding: Any = None) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(spec.shape, dtype, sharding=sharding)

    if shardings is None:
        return jax.tree.map(one, specs, is_leaf=is_spec)
    return jax.tree.map(one, specs, shardings, is_leaf=is_spec)


def param_shardings(specs: Any, mesh: Mesh, rules: ShardingRules | None = None) -> Any:
    """A NamedSharding per weight, from its logical axes through `rules`."""
    rules = rules or ShardingRules()
    return jax.tree.map(
        lambda s: rules.sharding(mesh, s.logical_axes, s.shape), specs, is_leaf=is_spec
    )
