"""Training batches for the model's log-prob pass (`vlmgym_model.completion_logprobs`):
`to_policy_inputs` turns a `RolloutBatch` into `CompletionInputs`, finding the prompts a
group's samples share so each runs once; `slice_rows` cuts a minibatch out of one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
from vlmgym_model import CompletionInputs


def to_policy_inputs(
    batch: Any,
    layout: dict[str, Any],
    asarray: Callable[[Any], Any] = jnp.asarray,
    *,
    prompt_slots: int = 1,
) -> tuple[CompletionInputs, dict[str, int]]:
    """Arrays from a `RolloutBatch` plus its vision layout; returns static bounds.

    Rows whose prompts are identical (the samples of one group: same tokens, positions and
    image features) share one prompt row. The prompt count is padded with empty prompts to
    a multiple of `prompt_slots` (pass the number of groups per step so that every step
    compiles to the same shapes).

    `asarray` makes each leaf: `jnp.asarray` (default device), or `np.asarray` to keep the
    batch on the host (then slice it with `slice_rows` and place it on a mesh).
    """
    T = batch.prompt_len
    ids, seg, pos = batch.input_ids, batch.segment_ids, batch.positions
    R = ids.shape[0]
    features_of_row: list[list[int]] = [[] for _ in range(R)]
    for r, f in zip(batch.image_rows, batch.image_feature_index, strict=True):
        features_of_row[int(r)].append(int(f))
    first_row: dict[bytes, int] = {}
    row_prompt = np.zeros(R, np.int32)
    prompt_rows: list[int] = []
    for r in range(R):
        key = b"".join(
            (
                ids[r, :T].tobytes(),
                seg[r, :T].tobytes(),
                pos[:, r, :T].tobytes(),
                np.asarray(features_of_row[r], np.int64).tobytes(),
            )
        )
        if key not in first_row:
            first_row[key] = len(prompt_rows)
            prompt_rows.append(r)
        row_prompt[r] = first_row[key]
    P = -(-len(prompt_rows) // max(1, prompt_slots)) * max(1, prompt_slots)
    rows = np.asarray(prompt_rows + [prompt_rows[0]] * (P - len(prompt_rows)), np.int64)
    prompt_seg = seg[rows, :T].copy()
    prompt_seg[len(prompt_rows) :] = 0  # padding prompts: no token attends anything
    # Only the placeholders of the rows kept as prompts receive image features.
    is_prompt_row = np.full(R, -1, np.int32)
    is_prompt_row[prompt_rows] = np.arange(len(prompt_rows), dtype=np.int32)
    keep = is_prompt_row[batch.image_rows] >= 0
    arrays = {
        k: asarray(v) for k, v in layout.items() if k not in ("max_window_len", "max_image_len")
    }
    inputs = CompletionInputs(
        prompt_ids=asarray(ids[rows, :T]),
        prompt_segment_ids=asarray(prompt_seg),
        prompt_positions=asarray(pos[:, rows, :T]),
        targets=asarray(batch.targets),
        segment_ids=asarray(seg[:, T:]),
        positions=asarray(pos[:, :, T:]),
        row_prompt=asarray(row_prompt),
        image_rows=asarray(is_prompt_row[batch.image_rows[keep]]),
        image_cols=asarray(batch.image_cols[keep]),
        image_feature_index=asarray(batch.image_feature_index[keep]),
        pixel_values=None if batch.pixel_values is None else asarray(batch.pixel_values),
        layout=arrays or None,
    )
    bounds = {
        "max_window_len": int(layout.get("max_window_len", 0)),
        "max_image_len": int(layout.get("max_image_len", 0)),
    }
    return inputs, bounds


def slice_rows(inputs: CompletionInputs, rows: Any) -> CompletionInputs:
    """The same batch restricted to some completion rows, with the prompts they continue.

    The prompt count stays as it was, or shrinks to len(rows) when that is smaller (both
    are the same for every minibatch of a step, so the shapes are static); unused slots
    hold empty prompts. Images stay whole; their scatter indices follow the prompts.
    Works on host (numpy) or fully addressable device inputs; index arrays come back as
    numpy arrays.
    """
    rows = np.asarray(rows)
    row_prompt = np.asarray(inputs.row_prompt)[rows]
    used = np.unique(row_prompt)  # sorted prompt indices
    P = min(int(np.shape(inputs.prompt_ids)[0]), len(rows))
    remap = np.full(int(np.shape(inputs.prompt_ids)[0]), -1, np.int32)
    remap[used] = np.arange(len(used), dtype=np.int32)
    take = np.concatenate([used, np.full(P - len(used), used[0])]).astype(np.int64)
    prompt_seg = np.array(inputs.prompt_segment_ids)[take]
    prompt_seg[len(used) :] = 0
    image_rows = np.asarray(inputs.image_rows)
    keep = remap[image_rows] >= 0
    return dataclasses.replace(
        inputs,
        prompt_ids=np.asarray(inputs.prompt_ids)[take],
        prompt_segment_ids=prompt_seg,
        prompt_positions=np.asarray(inputs.prompt_positions)[:, take],
        targets=inputs.targets[rows],
        segment_ids=inputs.segment_ids[rows],
        positions=inputs.positions[:, rows],
        row_prompt=remap[row_prompt],
        image_rows=remap[image_rows[keep]],
        image_cols=np.asarray(inputs.image_cols)[keep],
        image_feature_index=np.asarray(inputs.image_feature_index)[keep],
    )
