"""Optimizer, learning-rate schedule, frozen subtrees, fp32 master weights, NaN guard.

    tx = make_optimizer(OptimConfig(lr=1e-6, warmup_steps=10, schedule="cosine",
                                    total_steps=500), trainable=trainable_by_name(params,
                                    frozen=("vision",)))
    opt_state = tx.init(params)

The chain is: global-norm clipping -> AdamW or Adafactor with the warmup schedule (the
learning rate is inside the transformation, so `optax.apply_updates` is all the update
needs). Frozen leaves get a zero update and no optimizer state (`optax.set_to_zero`
through `optax.multi_transform`), and are left out of the gradient norm.

Master weights. bf16 has 8 bits of mantissa: an update of lr * ~1 = 1e-6 added to a weight
of size 1e-2 is far below half a bf16 ulp and rounds away, so bf16 params stop learning.
Keep the params the optimizer sees (and the checkpoint stores) in fp32, and cast them for
the forward pass inside the loss function:

    def loss_fn(params, batch):
        logits = forward(cast_for_compute(params, jnp.bfloat16), ...)
    grads = jax.grad(loss_fn)(params_fp32, batch)   # fp32 grads: the cast's VJP casts back

The optimizer moments are then fp32 as well. The sampler takes
`cast_for_compute(params, jnp.bfloat16)` (one bf16 copy per step) or the fp32 params.
When memory is tight, bf16 params with `mu_dtype=jnp.bfloat16` halve the first moment, at
the price above.

NaN guard. `is_finite(loss, grads)` is a jittable bool; `apply_if_finite` selects the
updated params and optimizer state only when it holds, and otherwise keeps both unchanged
(the schedule does not advance), so one bad batch cannot poison the run.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from vlmgym_model import dotted_path

PyTree = Any
Trainable = PyTree | Callable[[PyTree], PyTree]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer and schedule settings.

    optimizer: "adamw" (decoupled weight decay) or "adafactor" (factored second moment, no
        first moment by default: far less state for large matrices). Adafactor runs with
        `multiply_by_parameter_scale=False`, so `lr` is an absolute step size as for AdamW.
    lr: peak learning rate.
    warmup_steps: linear warmup, lr * (step + 1) / warmup_steps for step < warmup_steps
        (the first update already moves; no wasted step at lr = 0).
    schedule: after warmup, "constant" (lr) or "cosine":
        lr * (min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * p)) / 2),
        p = min(1, (step - warmup_steps) / (total_steps - warmup_steps)).
    total_steps: needed by "cosine".
    min_lr_ratio: the cosine's floor as a fraction of lr.
    weight_decay: decoupled weight decay coefficient (multiplied by the scheduled lr);
        applied to leaves with ndim >= 2 only when `decay_matrices_only` (not to norms and
        biases).
    b1, b2, eps: Adam moments' decay rates and epsilon (Adafactor uses b1 as its momentum
        when > 0 and b2 as its second-moment decay; `adafactor_momentum=False` drops b1).
    max_grad_norm: clip gradients to this global norm (over trainable leaves); None = off.
    mu_dtype: dtype of AdamW's first moment (None = float32).
    update_rounding: how low-precision (bf16) params take an update (`apply_updates`):
        "nearest" or "stochastic".

    Optimizer statistics are float32 whatever the params' dtype (bf16 params keep fp32
    moments, or Adafactor's factored fp32 statistics); bf16 gradients promote to float32
    inside the update, and only the final sum is rounded to the params' dtype.
    """

    optimizer: Literal["adamw", "adafactor"] = "adamw"
    lr: float = 1e-6
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    total_steps: int | None = None
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    decay_matrices_only: bool = True
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    mu_dtype: str | None = None
    adafactor_momentum: bool = False
    update_rounding: Literal["nearest", "stochastic"] = "nearest"

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "adafactor"):
            raise ValueError(f"optimizer must be 'adamw' or 'adafactor', got {self.optimizer!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.schedule == "cosine":
            if self.total_steps is None:
                raise ValueError("schedule='cosine' needs total_steps")
            if self.total_steps <= self.warmup_steps:
                raise ValueError(
                    f"total_steps ({self.total_steps}) must exceed warmup_steps "
                    f"({self.warmup_steps})"
                )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0):
            raise ValueError(f"b1 and b2 must be in [0, 1), got {self.b1}, {self.b2}")
        if self.update_rounding not in ("nearest", "stochastic"):
            raise ValueError(
                f"update_rounding must be 'nearest' or 'stochastic', got {self.update_rounding!r}"
            )
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {self.max_grad_norm}")


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """The learning rate at optimizer step `count` (0 for the first update); see OptimConfig.

    warmup:   lr * (count + 1) / warmup_steps                       count < warmup_steps
    constant: lr
    cosine:   lr * (m + (1 - m) * (1 + cos(pi * p)) / 2),  m = min_lr_ratio,
              p = clip((count - warmup_steps) / (total_steps - warmup_steps), 0, 1)
    """
    lr, warmup = cfg.lr, cfg.warmup_steps
    decay_steps = (cfg.total_steps or 0) - warmup

    def schedule(count: jax.Array | int) -> jax.Array:
        step = jnp.asarray(count, jnp.float32)
        if cfg.schedule == "cosine":
            p = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
            cos = 0.5 * (1.0 + jnp.cos(math.pi * p))
            after = lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cos)
        else:
            after = jnp.full_like(step, lr)
        if warmup == 0:
            return after
        return jnp.where(step < warmup, lr * (step + 1.0) / warmup, after)

    return schedule


def _decay_mask(params: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def _base_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    schedule = make_schedule(cfg)
    mask = _decay_mask if cfg.decay_matrices_only else None
    if cfg.optimizer == "adamw":
        return optax.adamw(
            learning_rate=schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=mask,
            mu_dtype=jnp.dtype(cfg.mu_dtype) if cfg.mu_dtype else jnp.float32,
        )
    return optax.adafactor(
        learning_rate=schedule,
        multiply_by_parameter_scale=False,
        decay_rate=cfg.b2,
        momentum=cfg.b1 if cfg.adafactor_momentum and cfg.b1 > 0 else None,
        eps=cfg.eps,
        weight_decay_rate=cfg.weight_decay or None,
        weight_decay_mask=mask,
    )


def _in_float32(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` with float32 statistics whatever the params' dtype: its state is initialised
    from float32 shapes, and bf16 gradients then promote to float32 inside each update's
    arithmetic (no float32 copy of the gradients is made: for a 7B model that copy alone
    would be 30 GiB)."""

    def init(params: PyTree) -> optax.OptState:
        return tx.init(cast_for_compute(params, jnp.float32))

    def update(
        updates: PyTree, state: optax.OptState, params: PyTree | None = None
    ) -> tuple[PyTree, optax.OptState]:
        new_updates, new_state = tx.update(updates, state, params)
        # statistics a transformation computes in the gradients' dtype go back to float32
        new_state = jax.tree.map(lambda n, o: jnp.asarray(n).astype(o.dtype), new_state, state)
        return new_updates, new_state

    return optax.GradientTransformation(init, update)


def make_optimizer(
    cfg: OptimConfig, params: PyTree | None = None, *, trainable: Trainable | None = None
) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW/Adafactor with the schedule of `cfg`; frozen leaves masked.

    trainable: a pytree of bools with the params' structure (True = train), or a callable
        params -> such a pytree (e.g. `lambda p: trainable_by_name(p, frozen=("vision",))`).
        Leaves marked False get a zero update and no optimizer state, and do not count in
        the gradient norm. None trains everything.
    params: optional; when given with a pytree `trainable`, the two structures are checked
        here rather than at `tx.init`.

    Updates already include the learning rate: `params = optax.apply_updates(params, u)`.
    """
    train = _base_optimizer(cfg)
    if cfg.max_grad_norm is not None:
        train = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), train)
    train = _in_float32(train)
    if trainable is None:
        return train
    if params is not None and not callable(trainable):
        want = jax.tree.structure(params)
        got = jax.tree.structure(trainable)
        if want != got:
            raise ValueError(
                f"trainable must have the params' structure; params {want}, trainable {got}"
            )

    def labels(p: PyTree) -> PyTree:
        flags = trainable(p) if callable(trainable) else trainable
        return jax.tree.map(lambda t: "train" if t else "freeze", flags)

    return optax.multi_transform({"train": train, "freeze": optax.set_to_zero()}, labels)


def trainable_by_name(params: PyTree, frozen: Iterable[str]) -> PyTree:
    """A pytree of bools: False for leaves whose dotted path matches one of `frozen`.

    Paths are spelled as in `vlmgym_model`'s checkpoints (`vision.blocks.qkv`,
    `text.layers.q_proj`). Each pattern is a regular expression matched at the start of the
    path on a component boundary: "vision" freezes `vision.*`, not `vision_proj`.
    """
    patterns = [re.compile(rf"(?:{p})(?:\.|$)") for p in frozen]
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    flags = [not any(pat.match(dotted_path(path)) for pat in patterns) for path, _ in flat]
    return jax.tree.unflatten(treedef, flags)


def cast_for_compute(params: PyTree, dtype: Any) -> PyTree:
    """Cast floating-point leaves to `dtype` (integer and key leaves stay as they are).

    Differentiable: inside a loss function it turns fp32 master params into bf16 compute
    params, and `jax.grad` returns fp32 gradients for the fp32 params.
    """
    dtype = jnp.dtype(dtype)

    def cast(x: Any) -> Any:
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.asarray(x).astype(dtype)
        return x

    return jax.tree.map(cast, params)


def is_finite(loss: jax.Array, grads: PyTree, grad_norm: jax.Array | None = None) -> jax.Array:
    """bool[]: True when `loss` and every floating-point leaf of `grads` are finite. Jittable.

    Decided on the global gradient norm (pass it when it is computed anyway): a sum of
    squares is NaN or inf exactly when some element is NaN or inf, or so large (> ~1e19)
    that its square overflows, which is no update to apply either. One reduction instead of
    a separate pass over every gradient.
    """
    if grad_norm is None:
        leaves = jax.tree.leaves(grads)
        floats = [x for x in leaves if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
        grad_norm = optax.tree.norm(floats)
    return jnp.isfinite(loss).all() & jnp.isfinite(grad_norm)


def _hashed_bits(shape: tuple[int, ...], seed: jax.Array) -> jax.Array:
    """uint32 pseudo-random bits per element: murmur3's finaliser of (flat index, seed).

    Elementwise on an iota, so XLA fuses it into the update that consumes it: no buffer of
    random bits the size of the weights (`jax.random.bits` materialises one per leaf, 4
    bytes a parameter). Uniform enough for rounding decisions, not for cryptography.
    """
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        iota = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
        index = index + iota * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    h = index ^ (seed * jnp.uint32(0x9E3779B9))
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def stochastic_round(x: jax.Array, key: jax.Array) -> jax.Array:
    """float32 -> bfloat16, rounded up with probability equal to the dropped fraction:
    E[stochastic_round(x)] = x, so updates far below half a bf16 ulp still move a weight
    on average. Adds 16 random bits below bf16's last mantissa bit and truncates."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    seed = jax.random.bits(key, (), jnp.uint32)
    noise = _hashed_bits(x.shape, seed) & jnp.uint32(0xFFFF)
    rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)


def apply_updates(
    params: PyTree, updates: PyTree, rounding: str = "nearest", key: jax.Array | None = None
) -> PyTree:
    """params + updates, in float32, rounded back to each param's dtype: to nearest, or
    stochastically for bfloat16 params (`rounding="stochastic"`, needs `key`)."""
    if rounding == "nearest":
        return optax.apply_updates(params, updates)
    assert key is not None, "stochastic rounding needs a key"
    leaves, treedef = jax.tree.flatten(params)
    keys = list(jax.random.split(key, max(1, len(leaves))))

    def one(p: jax.Array, u: jax.Array) -> jax.Array:
        k = keys.pop()
        total = p.astype(jnp.float32) + u.astype(jnp.float32)
        return stochastic_round(total, k) if p.dtype == jnp.bfloat16 else total.astype(p.dtype)

    return jax.tree.unflatten(
        treedef, [one(p, u) for p, u in zip(leaves, treedef.flatten_up_to(updates), strict=True)]
    )


def apply_if_finite(
    tx: optax.GradientTransformation,
    grads: PyTree,
    opt_state: optax.OptState,
    params: PyTree,
    loss: jax.Array,
    grad_norm: jax.Array | None = None,
    *,
    rounding: str = "nearest",
    key: jax.Array | None = None,
) -> tuple[PyTree, optax.OptState, jax.Array]:
    """One optimizer step, skipped when the loss or a gradient is not finite. Jittable.

        ok = is_finite(loss, grads, grad_norm)
        params, opt_state = (apply(tx.update(grads)), new state) if ok else (params, opt_state)
        (computed either way, with zeros for non-finite gradients, then selected)

    `rounding` and `key` go to `apply_updates`. Returns (params, opt_state, ok). A skipped
    step leaves the optimizer's step count (and so the learning-rate schedule) where it was;
    count skips from `ok` in the metrics.
    """
    ok = is_finite(loss, grads, grad_norm)
    # Non-finite gradients become zeros, so the update below stays finite, and a select
    # keeps the old params and state: elementwise, fused into the update itself, where a
    # `lax.cond` made XLA copy its operands (two more params-sized buffers).
    safe = jax.tree.map(lambda g: jnp.where(ok, g, jnp.zeros_like(g)), grads)
    updates, new_state = tx.update(safe, opt_state, params)
    # (The update itself is not checked: its norm would keep a params-sized buffer alive
    # until the select. Finite gradients make a finite update at the finite learning rates
    # the config allows; loading refuses non-finite weights anyway.)
    new_params = apply_updates(params, updates, rounding, key)

    def keep(new: Any, old: Any) -> Any:
        return jnp.where(ok, new, old) if hasattr(old, "dtype") else new

    new_params = jax.tree.map(keep, new_params, params)
    new_state = jax.tree.map(keep, new_state, opt_state)
    return new_params, new_state, ok
