"""Our JAX model's fp32 logits on the real-weights checkpoint, against HF transformers.

Chat prompts of different lengths go through our model in one left-padded batch, one of them
with an image. The reference is HF's model in float64, one unpadded row at a time: with logits
up to ~32 over 24 real layers, HF's own fp32 model is ~1e-4 away from float64 (eager 0.9e-4,
sdpa 1.5e-4 when measured), so fp32 against fp32 would compare two roundings, not find bugs.
(HF in float64 on a left-padded batch gives NaN at real tokens: its padding rows overflow.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from fixtures.real_model import IMAGE_TOKEN_ID
from PIL import Image, ImageDraw
from vlmgym_model import forward

ARGMAX_MARGIN = 1e-3  # positions whose top-2 HF logits are closer than this may flip


def drawn_image() -> Image.Image:
    """A 224x168 drawing: 16x12 patches, 48 merged image tokens, 2x2 windows of the tower."""
    image = Image.new("RGB", (224, 168), (240, 235, 220))
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 30, 100, 120), fill=(200, 30, 30))
    draw.ellipse((120, 40, 200, 150), fill=(30, 60, 200))
    draw.line((0, 160, 224, 0), fill=(20, 140, 40), width=6)
    return image


def user(text: str, image: bool = False) -> dict[str, Any]:
    content = [{"type": "image"}] if image else []
    return {"role": "user", "content": [*content, {"type": "text", "text": text}]}


CONVERSATIONS = [
    [user("Write a Python function that reverses a string.")],
    [
        {"role": "system", "content": "You are a terse code reviewer."},
        user("x = [i for i in range(10)]"),
        {"role": "assistant", "content": "Fine, but `list(range(10))` is simpler."},
        user("Why?"),
    ],
    [user("What shapes are in this image?", image=True)],
]


@contextlib.contextmanager
def in_float64(model: Any) -> Iterator[Any]:
    """The model in float64, then back to float32 (fp32 -> fp64 -> fp32 is exact)."""
    model.double()
    try:
        yield model
    finally:
        model.float()


@pytest.fixture(scope="module")
def logits(hf_model, hf_processor, jax_model):
    """(ours, HF fp64, HF fp32, inputs): logits [B, T, V] of the padded batch; HF's fp64 rows
    are computed unpadded and placed at the real positions (NaN at padding)."""
    texts = hf_processor.apply_chat_template(CONVERSATIONS, add_generation_prompt=True)
    inputs = hf_processor(text=texts, images=[drawn_image()], padding=True, return_tensors="pt")
    assert "mm_token_type_ids" in inputs  # else HF silently falls back to 1D positions
    config, params = jax_model
    ours = np.asarray(
        forward(
            params,
            config,
            inputs["input_ids"].numpy(),
            inputs["attention_mask"].numpy(),
            inputs["pixel_values"].numpy(),
            inputs["image_grid_thw"].numpy(),
        )
    )
    with torch.no_grad():
        ref32 = hf_model(**inputs).logits.float().numpy()
    mask = inputs["attention_mask"].numpy().astype(bool)
    ref64 = np.full(ours.shape, np.nan)
    with torch.no_grad(), in_float64(hf_model):
        for b in range(len(mask)):
            row = {k: inputs[k][b : b + 1, mask[b]] for k in ("input_ids", "mm_token_type_ids")}
            if (row["input_ids"] == IMAGE_TOKEN_ID).any():
                row["pixel_values"] = inputs["pixel_values"].double()
                row["image_grid_thw"] = inputs["image_grid_thw"]
            ref64[b, mask[b]] = hf_model(**row).logits[0].numpy()
    return ours, ref64, ref32, {k: v.numpy() for k, v in inputs.items()}


def test_logits_match_hf(logits, tol):
    ours, ref64, ref32, inputs = logits
    mask = inputs["attention_mask"].astype(bool)
    assert mask.sum(1).min() < mask.shape[1], "the batch should need padding"
    assert (inputs["input_ids"] == IMAGE_TOKEN_ID).sum() == 48
    assert np.isfinite(ours[mask]).all() and np.isfinite(ref64[mask]).all()
    err = np.abs(ours - ref64)[mask]  # [tokens, V]
    rows = [f"{np.abs(ours[b] - ref64[b])[mask[b]].max():.2e}" for b in range(len(mask))]
    print(
        f"\nmax |logit| {np.abs(ref64[mask]).max():.1f}; max abs error vs HF fp64 {err.max():.2e}"
        f" (rows {rows}); for scale, vs HF fp32 {np.abs(ours - ref32)[mask].max():.2e}, HF fp32"
        f" vs HF fp64 {np.abs(ref32 - ref64)[mask].max():.2e}"
    )
    assert np.abs(ref64[mask]).max() > 10, "real logits are large; these look random"
    assert err.max() <= tol["float32"], f"max abs error {err.max():.3e} (rows {rows})"


def test_argmax_agrees_where_hf_is_decided(logits):
    ours, ref, _, inputs = logits
    mask = inputs["attention_mask"].astype(bool)
    ours, ref = ours[mask], ref[mask]  # [tokens, V]
    top2 = np.sort(ref, axis=-1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > ARGMAX_MARGIN
    agree = ours.argmax(-1) == ref.argmax(-1)
    print(f"\nargmax agreement {agree.mean():.4f} overall, {agree[decided].mean():.4f} on "
          f"{decided.sum()}/{len(decided)} decided positions")  # fmt: skip
    assert decided.mean() > 0.9
    assert agree[decided].all()
