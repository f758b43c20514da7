"""Micro-batches: one optimizer update's gradient, accumulated over slices of its rows.

Peak memory of a training step grows with the rows that go through one forward/backward
pass. `--micro_batch_size R` cuts each (mini)batch into micro-batches of R rows and sums
their gradients inside one compiled program (`lax.scan`), so the activations held at once
are those of R rows, whatever `groups_per_batch x group_size`:

    features, vision_vjp = vjp(vision tower, vision params)    once per update: images are
                                                                per prompt, not per row
    for each micro-batch m (lax.scan):
        loss_m, (g_text, g_features) += grad(loss over rows of m)(text params, features)
    g_vision = vision_vjp(g_features)

The loss of a micro-batch divides by the whole batch's counts (`losses.Totals`: tokens,
rows, non-empty rows), so the losses, gradients and metrics of the micro-batches add up
to the full batch's exactly (up to summation order); metrics named `*_max` are maxima
(`is_max_metric`), combined by max instead. Rows are cut in order; a row count
that R does not divide is padded with masked copies of the first row (only multi-turn
rollouts, whose row counts vary, need it; `TrainConfig` checks the single-turn case).

`PolicyView` says how the trained pytree becomes the model's weights: the fp32 master
params cast to the compute dtype, or frozen base weights with LoRA adapters attached.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from vlmgym_model import (
    CompletionStatics,
    FeaturePlacement,
    ImageFeatures,
    ImageInputs,
    LoraConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLWeights,
    completion_logprobs,
    image_features,
    with_adapters,
)

from vlmgym_train.batch import Batch, place_batch, slice_rows
from vlmgym_train.losses import LossConfig, LossFn, LossInputs, Totals
from vlmgym_train.optim import cast_for_compute

PyTree = Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Micro:
    """One micro-batch (leaves stacked on a leading [M] axis in `MicroBatches`)."""

    batch: Batch  # prompts without images: their features come from `MicroBatches.images`
    placement: FeaturePlacement | None  # where the step's image features go in its prompts


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MicroBatches:
    """A (mini)batch as M micro-batches of equal shapes, plus what they share."""

    micro: Micro  # [M, ...]
    images: ImageInputs | None  # every image of the batch: the vision tower runs once
    totals: Totals  # the whole batch's counts (the losses' denominators)
    # real rows, before padding (a leaf, not static: a step's row count varies in multi-turn
    # runs, and the padded shapes are what compiles)
    rows: int

    @property
    def count(self) -> int:
        return int(np.shape(self.micro.batch.mask)[0])


def _pad_rows(batch: Batch, rows: int) -> Batch:
    """`batch` with masked copies of its first row appended up to `rows` rows."""
    extra = rows - batch.num_rows
    if extra == 0:
        return batch
    take = np.concatenate([np.arange(batch.num_rows), np.zeros(extra, np.int64)])
    padded = slice_rows(batch, take)
    mask = np.array(padded.mask)
    mask[batch.num_rows :] = 0
    advantages = np.array(padded.advantages)
    advantages[batch.num_rows :] = 0
    return dataclasses.replace(padded, mask=mask, advantages=advantages)


def _placements(parts: list[Batch]) -> list[FeaturePlacement] | None:
    """Each micro-batch's feature placement, padded to one entry per image feature (the
    batch's images are bucketed, so a constant per bucket) with dropped entries (row
    index = the prompt count, out of range)."""
    images = [p.inputs.prompts.images for p in parts]
    if images[0] is None:
        return None
    features = len(np.asarray(images[0].unit_inverse))
    longest = max(features, *(len(np.asarray(i.rows)) for i in images))

    def padded(x: Any, fill: int) -> np.ndarray:
        x = np.asarray(x)
        return np.concatenate([x, np.full(longest - len(x), fill)]).astype(np.int32)

    return [
        FeaturePlacement(
            rows=padded(img.rows, np.shape(part.inputs.prompts.ids)[0]),  # out of range
            cols=padded(img.cols, 0),
            feature_index=padded(img.feature_index, 0),
        )
        for part, img in zip(parts, images, strict=True)
    ]


def _without_images(batch: Batch) -> Batch:
    prompts = dataclasses.replace(batch.inputs.prompts, images=None)
    return dataclasses.replace(batch, inputs=dataclasses.replace(batch.inputs, prompts=prompts))


def split_micro(batch: Batch, micro_rows: int | None, *, bucket_rows: bool = False) -> MicroBatches:
    """Cut a host `Batch` into micro-batches of `micro_rows` rows (None: one micro-batch).

    bucket_rows: pad the rows (with masked copies) to a power of two of micro-batches, for
    steps whose row count varies (multi-turn runs): a few shapes, not one per step."""
    rows = batch.num_rows
    if bucket_rows:
        bucket = 1 << max(0, rows - 1).bit_length()
        micro_rows = bucket if micro_rows is None else min(micro_rows, bucket)
        count = 1 << max(0, -(-rows // micro_rows) - 1).bit_length()
    else:
        micro_rows = rows if micro_rows is None else min(micro_rows, rows)
        count = -(-rows // micro_rows)
    totals = Totals(
        tokens=np.float32(np.asarray(batch.mask).sum()),
        rows=np.float32(rows),
        nonempty=np.float32((np.asarray(batch.mask).sum(axis=1) > 0).sum()),
    )
    images = batch.inputs.prompts.images
    padded = _pad_rows(batch, count * micro_rows)
    parts = [
        slice_rows(padded, np.arange(m * micro_rows, (m + 1) * micro_rows)) for m in range(count)
    ]
    placements = _placements(parts)
    micros = [
        Micro(_without_images(p), None if placements is None else placements[i])
        for i, p in enumerate(parts)
    ]
    stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *micros)
    if images is not None:  # the micro-batches' placements are what place features
        none = np.zeros(0, np.int32)
        images = dataclasses.replace(images, rows=none, cols=none, feature_index=none)
    return MicroBatches(micro=stacked, images=images, totals=totals, rows=rows)


def place_micro(micro: MicroBatches, place: Callable[[Any, int | None], Any]) -> MicroBatches:
    """`place_batch` for micro-batches: rows are split over the mesh's batch axes within
    each micro-batch (axis 1 of the stacked leaves); images and counts are replicated."""
    stacked = micro.micro

    def shifted(x: Any, axis: int | None) -> Any:
        return place(x, None if axis is None else axis + 1)

    placement = stacked.placement
    return MicroBatches(
        micro=Micro(
            batch=place_batch(stacked.batch, shifted),
            placement=None
            if placement is None
            else jax.tree.map(lambda x: place(x, None), placement),
        ),
        images=None
        if micro.images is None
        else jax.tree.map(lambda x: place(x, None), micro.images),
        totals=jax.tree.map(lambda x: place(x, None), micro.totals),
        rows=micro.rows,
    )


@dataclasses.dataclass(frozen=True)
class PolicyView:
    """How the trained pytree becomes the model's weights (hashable: a jit static).

    Full fine-tuning: the trained pytree is the params (`Qwen2_5_VLWeights`), cast to
    `compute_dtype`. LoRA: it is the adapters ({path: LoraPair}), attached to the frozen
    base weights (`frozen`, already in the compute dtype) and cast likewise.
    """

    compute_dtype: Any = jnp.float32
    lora: LoraConfig | None = None

    def split(self, trainable: PyTree) -> tuple[PyTree, PyTree]:
        """(vision part, text part) of the trained pytree."""
        if self.lora is None:
            return trainable.vision, trainable.text
        vision = {k: v for k, v in trainable.items() if k.startswith("vision.")}
        return vision, {k: v for k, v in trainable.items() if not k.startswith("vision.")}

    def join(self, vision: PyTree, text: PyTree) -> PyTree:
        if self.lora is None:
            return Qwen2_5_VLWeights(text=text, vision=vision)
        return {**text, **vision}

    def weights(self, part: PyTree, frozen: PyTree, which: str) -> PyTree:
        """The model's `which` ("vision" or "text") weights from that part of the tree."""
        part = cast_for_compute(part, self.compute_dtype)
        if self.lora is None:
            return part
        return getattr(with_adapters(frozen, part, self.lora), which)


def _add(acc: PyTree, x: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: a + b.astype(a.dtype), acc, x)


def is_max_metric(name: str) -> bool:
    """Whether a loss metric is a maximum (over tokens, >= 0): named `*_max`. Micro-batches
    and updates combine those by max; every other metric is a sum over micro-batches."""
    return name.endswith("_max")


def _add_metrics(acc: dict[str, jax.Array], x: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Metrics of micro-batches so far plus one more: sums, or maxima for `*_max`."""
    return {k: jnp.maximum(v, x[k]) if is_max_metric(k) else v + x[k] for k, v in acc.items()}


def _zeros(shapes: PyTree, dtype: Any = None) -> PyTree:
    return jax.tree.map(lambda s: jnp.zeros(s.shape, dtype or s.dtype), shapes)


def _index(tree: PyTree, m: int) -> PyTree:
    return jax.tree.map(lambda x: x[m], tree)


def micro_gradients(
    view: PolicyView,
    trainable: PyTree,
    frozen: PyTree,
    micro: MicroBatches,
    *,
    config: Qwen2_5_VLConfig,
    statics: CompletionStatics,
    loss_fn: LossFn,
    loss_cfg: LossConfig,
) -> tuple[PyTree, dict[str, jax.Array]]:
    """The loss's gradient with respect to `trainable` over all micro-batches, and the
    loss's metrics (sums over micro-batches: each is already divided by the totals; maxima
    for `*_max`).

    Gradients are accumulated in the trained pytree's dtype.
    """
    vision_part, text_part = view.split(trainable)
    features, vision_vjp = _vision(view, vision_part, frozen, micro.images, config, statics)

    def loss_of(text: PyTree, feats: ImageFeatures | None, m: Micro) -> tuple[jax.Array, Any]:
        weights = Qwen2_5_VLWeights(text=view.weights(text, frozen, "text"), vision=None)
        placed = None if feats is None else (feats, m.placement)
        logp, entropy = completion_logprobs(weights, config, m.batch.inputs, statics, placed)
        return loss_fn(LossInputs.from_batch(m.batch, logp, entropy, micro.totals), loss_cfg)

    grad_fn = jax.value_and_grad(loss_of, argnums=(0, 1), has_aux=True)
    if micro.count == 1:
        (_, metrics), (g_text, g_feats) = grad_fn(text_part, features, _index(micro.micro, 0))
    else:

        def body(carry: Any, m: Micro) -> tuple[Any, None]:
            (_, metrics), grads = grad_fn(text_part, features, m)
            acc_grads, acc_metrics = carry
            return (_add(acc_grads, grads), _add_metrics(acc_metrics, metrics)), None

        shapes = jax.eval_shape(grad_fn, text_part, features, _index(micro.micro, 0))
        (_, metric_shapes), (text_shapes, feature_shapes) = shapes
        zeros = (
            (_zeros(text_shapes), _zeros(feature_shapes, jnp.float32)),
            _zeros(metric_shapes),
        )
        ((g_text, g_feats), metrics), _ = jax.lax.scan(body, zeros, micro.micro)
    if vision_vjp is not None:
        g_feats = jax.tree.map(lambda g, f: g.astype(f.dtype), g_feats, features)
        (g_vision,) = vision_vjp(g_feats)
    else:
        g_vision = jax.tree.map(jnp.zeros_like, vision_part)
    return view.join(g_vision, g_text), metrics


def _vision(
    view: PolicyView,
    vision_part: PyTree,
    frozen: PyTree,
    images: ImageInputs | None,
    config: Qwen2_5_VLConfig,
    statics: CompletionStatics,
) -> tuple[ImageFeatures | None, Callable[[Any], Any] | None]:
    """The images' features, and the vjp to the vision part when it is trained."""
    if images is None:
        return None, None

    def tower(part: PyTree) -> ImageFeatures:
        weights = view.weights(part, frozen, "vision")
        return image_features(weights, config, images, impl=statics.impl, remat=statics.remat)

    if not statics.train_vision or not jax.tree.leaves(vision_part):
        return jax.lax.stop_gradient(tower(vision_part)), None
    return jax.vjp(tower, vision_part)


def micro_logprobs(
    view: PolicyView,
    trainable: PyTree,
    frozen: PyTree,
    micro: MicroBatches,
    *,
    config: Qwen2_5_VLConfig,
    statics: CompletionStatics,
) -> jax.Array:
    """float32[M * R, N] log-probs of the batch's completions, padding rows included (the
    first `micro.rows` are the batch's), one micro-batch at a time (the reference
    policy's pass): the vision tower once, the decoder per micro-batch."""
    vision_part, text_part = view.split(trainable)
    features, _ = _vision(
        view, vision_part, frozen, micro.images, config,
        dataclasses.replace(statics, train_vision=False),
    )  # fmt: skip
    weights = Qwen2_5_VLWeights(text=view.weights(text_part, frozen, "text"), vision=None)

    def one(m: Micro) -> jax.Array:
        placed = None if features is None else (features, m.placement)
        logp, _ = completion_logprobs(weights, config, m.batch.inputs, statics, placed)
        return logp

    logp = jax.lax.map(one, micro.micro)  # [M, R, N]
    return logp.reshape(-1, logp.shape[-1])
