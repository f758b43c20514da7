"""One step's training rows as one pytree: what a rollout produces and what the loss reads.

Every sampled turn is a row: R rows of N completion tokens, each continuing one of P
prompts. The samples of a GRPO group share their prompt row (`CompletionInputs.row_prompt`),
so the prompt runs through the model once per group, not once per sample; equal prompts of
later turns (trajectories that drew the same tokens and got the same reply) are run once
too. Rows carry their loss-side arrays (mask, behaviour log-probs, advantages, reference
log-probs) and per-row info (which trajectory, whether it was cut by the length limit)
beside the model's inputs, and `slice_rows` cuts a minibatch out of all of them at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from vlmgym_model import CompletionInputs, ModelInputs, Qwen2_5_VLConfig, image_inputs

if TYPE_CHECKING:
    from vlmgym_train.rollout import TurnRows


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Batch:
    """R training rows of N completion tokens (host numpy arrays until placed on a mesh)."""

    inputs: CompletionInputs  # the model's inputs and the targets
    mask: Any  # float32[R, N]: 1 on sampled tokens up to and including the stop token
    old_logp: Any  # float32[R, N]: behaviour (untempered) log-probs from the sampler
    advantages: Any  # float32[R]: the advantage of each row's trajectory
    trajectory: Any  # int32[R]: which trajectory of the step the row belongs to
    truncated: Any  # bool[R]: finished by the length limit, not by a stop token
    ref_logp: Any = None  # float32[R, N]: reference-policy log-probs (KL), when used
    num_tokens: Any = None  # float32[]: token_mean's denominator (see LossInputs)
    kl_coef: Any = None  # float32[]: the KL coefficient of the update (see LossInputs)
    # float32[R, N]: the sampler's log-probs when old_logp holds the trainer's recomputed
    # ones (the IS corrections' behaviour policy, see vlmgym_train.offpolicy); None: old_logp
    behaviour_logp: Any = None

    @property
    def num_rows(self) -> int:
        return int(np.shape(self.mask)[0])

    def lengths(self) -> np.ndarray:
        """int[R]: completion tokens per row."""
        return np.asarray(self.mask).sum(axis=1).astype(np.int64)


def _prompt_images(gen: Any, image_token_id: int, merge: int) -> list[tuple[slice, slice]]:
    """For each prompt of a generation: its slices of image_grid_thw and of pixel_values."""
    grids = np.zeros((0, 3), np.int64) if gen.image_grid_thw is None else gen.image_grid_thw
    tokens_per_image = grids.prod(axis=1) // merge
    out = []
    k = patch = 0
    for b in range(gen.prompt_ids.shape[0]):
        need = int((gen.prompt_ids[b] == image_token_id).sum())
        first, first_patch = k, patch
        while need > 0:
            need -= int(tokens_per_image[k])
            patch += int(grids[k].prod())
            k += 1
        if need:
            raise ValueError(f"prompt {b}: image placeholders do not match image_grid_thw")
        out.append((slice(first, k), slice(first_patch, patch)))
    return out


def _owners(turn: TurnRows, b: int, group_size: int) -> list[int]:
    """The trajectory of each sample of prompt b (a first turn's group: n consecutive ids)."""
    owner = turn.trajectories[b]
    return [owner + j for j in range(group_size)] if group_size > 1 else [owner]


def _prompt_key(gen: Any, b: int, images: tuple[slice, slice]) -> bytes:
    """A digest of prompt b of a generation: its real tokens, positions and images. Equal
    keys mean the model sees the same input, so the prompt is run once for all its rows."""
    real = np.asarray(gen.prompt_mask[b]) > 0
    digest = hashlib.blake2b(digest_size=20)
    digest.update(np.ascontiguousarray(gen.prompt_ids[b][real]).tobytes())
    digest.update(np.ascontiguousarray(gen.prompt_positions[:, b][:, real]).tobytes())
    grid_slice, patch_slice = images
    if grid_slice.stop > grid_slice.start:
        digest.update(np.ascontiguousarray(gen.image_grid_thw[grid_slice]).tobytes())
        digest.update(np.ascontiguousarray(gen.pixel_values[patch_slice]).tobytes())
    return digest.digest()


class _Rows:
    """Accumulates prompts and completion rows for `build_batch`."""

    def __init__(self, prompt_len: int, new_tokens: int, pad_token_id: int) -> None:
        self.T, self.N, self.pad = prompt_len, new_tokens, pad_token_id
        self.p_ids: list[np.ndarray] = []
        self.p_index: dict[bytes, int] = {}  # `_prompt_key` -> prompt index
        self.p_seg: list[np.ndarray] = []
        self.p_pos: list[np.ndarray] = []
        self.pixels: list[np.ndarray] = []
        self.grids: list[np.ndarray] = []
        self.img_rows: list[np.ndarray] = []
        self.img_cols: list[np.ndarray] = []
        self.rows: dict[str, list[Any]] = {
            k: [] for k in ("targets", "seg", "pos", "old", "row_prompt", "trajectory", "truncated")
        }

    def add_prompt(self, gen: Any, b: int, images: tuple[slice, slice], image_token: int) -> int:
        """Prompt b of a generation, left-padded to T, with its images; returns its index.
        A prompt equal to one already added (same tokens, positions and images) is not
        added again: its index is returned."""
        key = _prompt_key(gen, b, images)
        if key in self.p_index:
            return self.p_index[key]
        self.p_index[key] = len(self.p_ids)
        shift = self.T - gen.prompt_ids.shape[1]
        ids = np.full(self.T, self.pad, np.int32)
        ids[shift:] = gen.prompt_ids[b]
        self.p_ids.append(ids)
        self.p_seg.append(np.pad(gen.prompt_mask[b].astype(np.int32), (shift, 0)))
        self.p_pos.append(np.pad(gen.prompt_positions[:, b].astype(np.int32), ((0, 0), (shift, 0))))
        grid_slice, patch_slice = images
        if grid_slice.stop > grid_slice.start:
            assert gen.pixel_values is not None and gen.image_grid_thw is not None
            self.pixels.append(gen.pixel_values[patch_slice])
            self.grids.append(gen.image_grid_thw[grid_slice])
            cols = np.flatnonzero(ids == image_token).astype(np.int32)
            self.img_rows.append(np.full(len(cols), len(self.p_ids) - 1, np.int32))
            self.img_cols.append(cols)
        return len(self.p_ids) - 1

    def add_row(self, sample: Any, prompt: int, next_pos: int, trajectory: int) -> None:
        """One sampled completion of `prompt`, right-padded to N."""
        k, N, rows = sample.length, self.N, self.rows
        targets = np.full(N, self.pad, np.int32)
        targets[:k] = sample.tokens
        rows["targets"].append(targets)
        rows["seg"].append((np.arange(N) < k).astype(np.int32))
        rows["pos"].append(np.broadcast_to(next_pos + np.arange(N, dtype=np.int32), (3, N)))
        rows["old"].append(np.pad(np.asarray(sample.logprobs, np.float32), (0, N - k)))
        rows["row_prompt"].append(prompt)
        rows["trajectory"].append(trajectory)
        rows["truncated"].append(sample.finish_reason == "length")

    def batch(self, config: Qwen2_5_VLConfig, prompt_slots: int) -> Batch:
        """The rows as a `Batch`, the prompt count padded to a multiple of `prompt_slots`
        with empty copies of the first prompt."""
        rows = self.rows
        if not rows["targets"]:
            raise ValueError("no rows selected for the batch")
        P = len(self.p_ids)
        # prompt slots: a multiple of `prompt_slots`, the multiple a power of two (the count
        # varies from step to step in multi-turn runs: a few shapes, not one per step)
        slots = max(1, prompt_slots)
        pad = slots * (1 << max(0, -(-P // slots) - 1).bit_length()) - P
        images = None
        if self.pixels:
            images = image_inputs(
                config,
                np.concatenate(self.pixels),
                np.concatenate(self.grids),
                np.concatenate(self.img_rows),
                np.concatenate(self.img_cols),
                bucket=True,
            )
        prompts = ModelInputs(
            ids=np.stack(self.p_ids + [self.p_ids[0]] * pad),
            segment_ids=np.stack(self.p_seg + [np.zeros(self.T, np.int32)] * pad),
            positions=np.stack(self.p_pos + [self.p_pos[0]] * pad, axis=1),
            images=images,
        )
        seg = np.stack(rows["seg"])
        return Batch(
            inputs=CompletionInputs(
                prompts=prompts,
                targets=np.stack(rows["targets"]),
                segment_ids=seg,
                positions=np.stack(rows["pos"], axis=1),
                row_prompt=np.asarray(rows["row_prompt"], np.int32),
            ),
            mask=seg.astype(np.float32),
            old_logp=np.stack(rows["old"]),
            advantages=np.zeros(len(seg), np.float32),
            trajectory=np.asarray(rows["trajectory"], np.int32),
            truncated=np.asarray(rows["truncated"], bool),
        )


def build_batch(
    config: Qwen2_5_VLConfig,
    turns: Sequence[TurnRows],
    max_new_tokens: int,
    pad_token_id: int,
    select: Sequence[int] | None = None,
    *,
    prompt_slots: int = 1,
) -> Batch:
    """The training rows of the selected trajectories (advantages zero until set).

    Args:
      select: trajectory indices to train on, in order (default: all). Row `trajectory`
        ids are positions in this list. Prompts none of whose samples are selected are
        left out, with their images.
      prompt_slots: the prompt count is padded with empty prompts to a multiple of this
        (the number of groups per step: every step then compiles to the same shapes).

    Turns of a multi-turn rollout may have different prompt buckets; all prompts are
    left-padded to the longest. Prompts with the same tokens, positions and images are
    kept once and their rows share it (`_prompt_key`).
    """
    if select is None:
        select = sorted(
            {
                o
                for t in turns
                for b, group in enumerate(t.generation.samples)
                for o in _owners(t, b, len(group))
            }
        )
    position = {int(o): i for i, o in enumerate(select)}
    T = max(t.generation.prompt_ids.shape[1] for t in turns)
    out = _Rows(T, max_new_tokens, pad_token_id)
    for turn in turns:
        gen = turn.generation
        images = _prompt_images(gen, config.image_token_id, config.vision.merge_unit)
        for b, group in enumerate(gen.samples):
            owners = _owners(turn, b, len(group))
            chosen = [j for j, o in enumerate(owners) if o in position]
            if not chosen:
                continue
            prompt = out.add_prompt(gen, b, images[b], config.image_token_id)
            next_pos = int(gen.prompt_mask[b].sum()) + int(gen.rope_deltas[b])
            for j in chosen:
                out.add_row(group[j], prompt, next_pos, position[owners[j]])
    return out.batch(config, prompt_slots)


def slice_rows(batch: Batch, rows: Any) -> Batch:
    """The same batch restricted to some rows, with the prompts they continue.

    The prompt count stays as it was, or shrinks to len(rows) when that is smaller (both
    are the same for every minibatch of a step, so the shapes are static); unused slots
    hold empty prompts. Images stay whole; only the placeholders of the kept prompts
    receive features. Works on host (numpy) or fully addressable device arrays; index
    arrays come back as numpy arrays.
    """
    rows = np.asarray(rows)
    inputs = batch.inputs
    prompts = inputs.prompts
    n_prompts = int(np.shape(prompts.ids)[0])
    row_prompt = np.asarray(inputs.row_prompt)[rows]
    used = np.unique(row_prompt)  # sorted prompt indices
    P = min(n_prompts, len(rows))
    remap = np.full(n_prompts, -1, np.int32)
    remap[used] = np.arange(len(used), dtype=np.int32)
    take = np.concatenate([used, np.full(P - len(used), used[0])]).astype(np.int64)
    prompt_seg = np.array(prompts.segment_ids)[take]
    prompt_seg[len(used) :] = 0
    images = prompts.images
    if images is not None:
        keep = remap[np.asarray(images.rows)] >= 0
        images = dataclasses.replace(
            images,
            rows=remap[np.asarray(images.rows)[keep]],
            cols=np.asarray(images.cols)[keep],
            feature_index=np.asarray(images.feature_index)[keep],
        )
    sliced_prompts = ModelInputs(
        ids=np.asarray(prompts.ids)[take],
        segment_ids=prompt_seg,
        positions=np.asarray(prompts.positions)[:, take],
        images=images,
    )

    def per_row(x: Any, axis: int = 0) -> Any:
        return None if x is None else np.take(np.asarray(x), rows, axis=axis)

    return dataclasses.replace(
        batch,
        inputs=CompletionInputs(
            prompts=sliced_prompts,
            targets=per_row(inputs.targets),
            segment_ids=per_row(inputs.segment_ids),
            positions=per_row(inputs.positions, axis=1),
            row_prompt=remap[row_prompt],
        ),
        mask=per_row(batch.mask),
        old_logp=per_row(batch.old_logp),
        advantages=per_row(batch.advantages),
        trajectory=per_row(batch.trajectory),
        truncated=per_row(batch.truncated),
        ref_logp=per_row(batch.ref_logp),
        behaviour_logp=per_row(batch.behaviour_logp),
    )


def place_batch(batch: Batch, place: Callable[[Any, int | None], Any]) -> Batch:
    """`batch` with every leaf passed through `place(array, row_axis)`: the axis that
    counts rows (or prompts), None for arrays without one (images, scalars)."""
    prompts = batch.inputs.prompts
    images = prompts.images
    if images is not None:
        images = jax.tree.map(lambda x: place(x, None), images)
    return Batch(
        inputs=CompletionInputs(
            prompts=ModelInputs(
                ids=place(prompts.ids, 0),
                segment_ids=place(prompts.segment_ids, 0),
                positions=place(prompts.positions, 1),
                images=images,
            ),
            targets=place(batch.inputs.targets, 0),
            segment_ids=place(batch.inputs.segment_ids, 0),
            positions=place(batch.inputs.positions, 1),
            row_prompt=place(batch.inputs.row_prompt, 0),
        ),
        mask=place(batch.mask, 0),
        old_logp=place(batch.old_logp, 0),
        advantages=place(batch.advantages, 0),
        trajectory=place(batch.trajectory, 0),
        truncated=place(batch.truncated, 0),
        ref_logp=None if batch.ref_logp is None else place(batch.ref_logp, 0),
        num_tokens=None if batch.num_tokens is None else place(batch.num_tokens, None),
        kl_coef=None if batch.kl_coef is None else place(batch.kl_coef, None),
        behaviour_logp=None if batch.behaviour_logp is None else place(batch.behaviour_logp, 0),
    )
