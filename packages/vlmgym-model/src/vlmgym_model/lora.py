"""LoRA: low-rank adapters on the model's projections, as a small pytree beside the weights.

    cfg = LoraConfig(rank=64, alpha=128, targets=("attention", "mlp"))
    adapters = init_adapters(param_specs(config), cfg, key)    # {path: LoraPair}, fp32
    weights = with_adapters(base_params, adapters, cfg)         # what the model reads
    logits = forward_tokens(weights, inputs, config=config)

A targeted weight W (e.g. `text.layers.q_proj`, [L, D, N, H]) is replaced by a
`LoraWeight(base=W, a=A, b=B, scale=alpha / rank)`, and every projection of the model
goes through `vlmgym_model.matmul.einsum`, which computes

    y = x @ W + scale * (x @ A) @ B          A: [L, in..., r], B: [L, r, out...]

without forming W + scale * A @ B. The adapter path costs 2 * tokens * r * (in + out)
FLOPs per projection against the base's 2 * tokens * in * out: under 4% at r = 64 on a
3584-wide model. Layer scans slice `LoraWeight`s like any other leaf, so the sampler, the
log-prob pass and `forward` all run adapters unchanged.

Why a pytree and not a module rewrite. qwix (Tunix's LoRA) intercepts a Flax module's
einsums and adds the same low-rank path; PEFT swaps `nn.Linear` modules for LoRA layers.
This model is pure functions over a weights pytree, so the adapters are data: a dict from
a weight's dotted path to its `LoraPair`, which the optimizer trains while the base stays
frozen (and in the compute dtype), which checkpoints save alone, and which
`vlmgym_convert` maps to PEFT's `lora_A` / `lora_B` tensors. Conventions follow PEFT's
defaults: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with a = sqrt(5)), B = 0, so
step 0 equals the base model; scale = alpha / rank (`use_rslora`: alpha / sqrt(rank)); no
dropout (RL fine-tuning rarely uses it, and PEFT's default of 0 matches).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp

from vlmgym_model.weights import ParamSpec, dotted_path, is_spec

# target name -> (dotted path of the weight, number of input axes after the layer axis;
# 0: the weight is trained whole, PEFT's `modules_to_save`)
TARGETS: dict[str, tuple[str, int]] = {
    "q_proj": ("text.layers.q_proj", 1),
    "k_proj": ("text.layers.k_proj", 1),
    "v_proj": ("text.layers.v_proj", 1),
    "o_proj": ("text.layers.o_proj", 2),
    "gate_proj": ("text.layers.gate_proj", 1),
    "up_proj": ("text.layers.up_proj", 1),
    "down_proj": ("text.layers.down_proj", 1),
    "vision.qkv_proj": ("vision.blocks.qkv_proj", 1),
    "vision.o_proj": ("vision.blocks.o_proj", 2),
    "vision.gate_proj": ("vision.blocks.gate_proj", 1),
    "vision.up_proj": ("vision.blocks.up_proj", 1),
    "vision.down_proj": ("vision.blocks.down_proj", 1),
    "embed": ("text.embed", 0),
    "lm_head": ("text.lm_head", 0),
}
GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "vision": tuple(t for t in TARGETS if t.startswith("vision.")),
    "all": tuple(t for t, (_, n_in) in TARGETS.items() if n_in),  # every projection
}
DEFAULT_TARGETS = ("attention", "mlp")


def expand_targets(targets: Iterable[str]) -> tuple[str, ...]:
    """Target names with the groups ("attention", "mlp", "vision", "all") expanded, in
    `TARGETS` order. Unknown names raise a ValueError that lists the choices."""
    wanted: set[str] = set()
    for name in targets:
        name = name.strip()
        if name in GROUPS:
            wanted.update(GROUPS[name])
        elif name in TARGETS:
            wanted.add(name)
        else:
            raise ValueError(
                f"unknown LoRA target {name!r}; choose from {', '.join(TARGETS)} or the "
                f"groups {', '.join(GROUPS)}"
            )
    if not wanted:
        raise ValueError("no LoRA targets given")
    return tuple(t for t in TARGETS if t in wanted)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which projections get adapters, their rank and scale (hashable: a jit static).

    rank: r, the adapters' inner width (> 0).
    alpha: the scale's numerator: scale = alpha / rank (alpha / sqrt(rank) with rslora).
    targets: target names or groups (see `TARGETS`, `GROUPS`); expanded on construction.
        "embed" and "lm_head" are trained whole (PEFT's `modules_to_save`), not adapted.
    """

    rank: int
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        object.__setattr__(self, "targets", expand_targets(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def paths(self) -> dict[str, int]:
        """dotted weight path -> number of input axes, for every target."""
        return dict(TARGETS[t] for t in self.targets)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraPair:
    """One weight's adapters: a [L, in..., r] and b [L, r, out...]. (A weight trained whole
    is a plain array in the adapters dict instead.)"""

    a: Any
    b: Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraWeight:
    """A frozen weight with its adapters, in place of the weight (see the module doc).

    The model's code treats it as the weight: `matmul.einsum` adds the low-rank path, and
    `reshape_in` / `select_out` reshape it where the model reshapes a weight.
    """

    base: Any  # [..., in..., out...]
    a: Any  # [..., in..., r]
    b: Any  # [..., r, out...]
    scale: float = dataclasses.field(metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def dtype(self) -> Any:
        return self.base.dtype

    def merged(self) -> jax.Array:
        """base + scale * a @ b, as one array (exports; not used by the forward pass)."""
        a, b = self.a.astype(jnp.float32), self.b.astype(jnp.float32)
        n_lead = a.ndim + b.ndim - self.base.ndim - 2  # stacked-layer axes
        lead, r = a.shape[:n_lead], a.shape[-1]
        full = a.reshape(*lead, -1, r) @ b.reshape(*lead, r, -1)  # [lead..., in, out]
        full = full.reshape(self.base.shape)
        return (self.base.astype(jnp.float32) + self.scale * full).astype(self.base.dtype)


def reshape_in(w: Any, fused: int) -> Any:
    """w [in..., out...] with its input axes fused into one of size `fused`."""
    if isinstance(w, LoraWeight):
        r = w.a.shape[-1]
        return LoraWeight(w.base.reshape(fused, -1), w.a.reshape(fused, r), w.b, w.scale)
    return w.reshape(fused, -1)


def select_out(w: Any, index: int) -> Any:
    """w [in, S, out...] -> w[:, index]: one slice of its first output axis."""
    if isinstance(w, LoraWeight):
        return LoraWeight(w.base[:, index], w.a, w.b[:, index], w.scale)
    return w[:, index]


def lora_einsum(spec: str, x: jax.Array, w: LoraWeight, dense: Any) -> jax.Array:
    """x @ base + scale * (x @ a) @ b for a dense spec x[batch..., in...], w[in..., out...].

    `dense(spec, x, w)` is the plain product (`matmul.einsum`); a and b are cast to x's
    dtype, as PEFT's layers do under autocast.
    """
    inputs, out = spec.replace(" ", "").split("->")
    xs, ws = inputs.split(",")
    k = len(set(xs) & set(ws))
    free = next(c for c in "ZYXWVUSRQ" if c not in spec)
    batch = xs[: len(xs) - k]
    h = dense(f"{xs},{ws[:k]}{free}->{batch}{free}", x, w.a.astype(x.dtype))  # [batch..., r]
    delta = dense(f"{batch}{free},{free}{ws[k:]}->{out}", h, w.b.astype(x.dtype))
    return dense(spec, x, w.base) + (w.scale * delta).astype(x.dtype)


def _pair_specs(spec: ParamSpec, n_in: int, rank: int) -> LoraPair:
    """A's and B's specs for a stacked weight [L, in..., out...] with `n_in` input axes:
    each keeps the axes (and so the sharding) of the side it shares with the weight."""
    shape, axes = spec.shape, spec.logical_axes
    cut = 1 + n_in
    return LoraPair(
        a=ParamSpec((*shape[:cut], rank), (*axes[:cut], None)),
        b=ParamSpec((shape[0], rank, *shape[cut:]), (axes[0], None, *axes[cut:]), "zeros"),
    )


def adapter_specs(specs: Any, cfg: LoraConfig) -> dict[str, Any]:
    """{path: LoraPair(ParamSpec a, ParamSpec b)} for the targets present in the model's
    spec tree (`param_specs(config)`); sharded like the weights they adapt, r replicated.
    A weight trained whole keeps its own spec.

    Targets the model lacks (a vision gate on an ungated MLP) are skipped; none present
    at all is an error.
    """
    leaves = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]
    flat = {dotted_path(path): spec for path, spec in leaves}
    out: dict[str, LoraPair] = {}
    for path, n_in in cfg.paths.items():
        spec = flat.get(path)
        if spec is None:
            continue
        out[path] = _pair_specs(spec, n_in, cfg.rank) if n_in else spec
    if not out:
        raise ValueError(f"none of the LoRA targets {cfg.targets} exists in this model")
    return out


def init_adapters(
    specs: Any, cfg: LoraConfig, key: jax.Array, dtype: Any = jnp.float32, base: Any = None
) -> dict[str, Any]:
    """Fresh adapters (PEFT's init): a ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), b = 0; a weight
    trained whole starts as `base`'s (required then), in `dtype`."""
    pairs = adapter_specs(specs, cfg)
    keys = jax.random.split(key, len(pairs))
    flat_base = None
    out: dict[str, Any] = {}
    for k, (path, pair) in zip(keys, sorted(pairs.items()), strict=True):
        if not isinstance(pair, LoraPair):
            if base is None:
                raise ValueError(f"LoRA target {path} is trained whole: pass the base weights")
            if flat_base is None:
                flat_base = {
                    dotted_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(base)[0]
                }
            out[path] = jnp.asarray(flat_base[path], dtype)
            continue
        fan_in = math.prod(pair.a.shape[1:-1])
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(k, pair.a.shape, jnp.float32, -bound, bound).astype(dtype)
        out[path] = LoraPair(a, jnp.zeros(pair.b.shape, dtype))
    return out


def with_adapters(params: Any, adapters: dict[str, Any], cfg: LoraConfig) -> Any:
    """`params` with every adapted weight replaced by a `LoraWeight` (no copies), and every
    weight trained whole by its trained value."""
    missing = set(adapters)

    def attach(path: tuple[Any, ...], leaf: Any) -> Any:
        name = dotted_path(path)
        pair = adapters.get(name)
        if pair is None:
            return leaf
        missing.discard(name)
        if not isinstance(pair, LoraPair):  # a weight trained whole, in place of the base's
            return pair
        return LoraWeight(leaf, pair.a, pair.b, cfg.scale)

    out = jax.tree_util.tree_map_with_path(attach, params)
    if missing:
        raise ValueError(f"adapters for weights the model lacks: {sorted(missing)}")
    return out


def merge_adapters(params: Any, adapters: dict[str, Any], cfg: LoraConfig) -> Any:
    """Plain weights with the adapters folded in: W + scale * A @ B (for export)."""
    attached = with_adapters(params, adapters, cfg)
    return jax.tree.map(
        lambda x: x.merged() if isinstance(x, LoraWeight) else x,
        attached,
        is_leaf=lambda x: isinstance(x, LoraWeight),
    )


def flatten_adapters(adapters: dict[str, Any]) -> dict[str, Any]:
    """{"<path>.a": array, "<path>.b": array, "<path>.whole": array} (the on-disk layout of
    an adapter directory; ".whole" for a weight trained whole)."""
    flat = {}
    for p, pair in adapters.items():
        if isinstance(pair, LoraPair):
            flat.update({f"{p}.a": pair.a, f"{p}.b": pair.b})
        else:
            flat[f"{p}.whole"] = pair
    return flat


def unflatten_adapters(flat: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `flatten_adapters`; a tensor without its partner is an error."""
    pairs: dict[str, dict[str, Any]] = {}
    whole: dict[str, Any] = {}
    for name, x in flat.items():
        m = re.fullmatch(r"(.+)\.(a|b|whole)", name)
        if m is None:
            raise ValueError(f"adapter tensor {name!r} is not named <weight path>.a, .b or .whole")
        if m.group(2) == "whole":
            whole[m.group(1)] = x
            continue
        pairs.setdefault(m.group(1), {})[m.group(2)] = x
    for path, pair in pairs.items():
        if set(pair) != {"a", "b"}:
            raise ValueError(f"adapter {path!r} lacks its {'b' if 'a' in pair else 'a'} tensor")
    return {**{p: LoraPair(v["a"], v["b"]) for p, v in pairs.items()}, **whole}
