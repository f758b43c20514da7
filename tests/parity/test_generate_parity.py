"""Greedy generation equals HF `generate(do_sample=False)` token for token, in fp32."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import pytest
from fixtures.hf_models import IMAGE_TOKEN_ID, VISION_END_TOKEN_ID, VISION_START_TOKEN_ID
from fixtures.parity_io import hf_greedy as reference_greedy
from vlmgym_model import Sampler, SamplingParams

GRIDS = {"A": (1, 8, 8), "B": (1, 6, 10)}
NEW = 10
STOP = 7  # a token id the rows may produce: rows end independently when they do


def image_run(name: str) -> list[int]:
    t, h, w = GRIDS[name]
    return [VISION_START_TOKEN_ID] + [IMAGE_TOKEN_ID] * (t * h * w // 4) + [VISION_END_TOKEN_ID]


def pixels_for(names: list[str]) -> tuple[np.ndarray | None, np.ndarray | None]:
    if not names:
        return None, None
    grids = np.array([GRIDS[n] for n in names], np.int64)
    pieces = [
        np.random.default_rng(ord(n)).normal(size=(int(np.prod(GRIDS[n])), 1176)) for n in names
    ]
    return np.concatenate(pieces).astype(np.float32), grids


def row(rng: np.random.Generator, parts: list[Any]) -> tuple[list[int], list[str]]:
    ids: list[int] = []
    images = []
    for part in parts:
        if isinstance(part, str):
            ids += image_run(part)
            images.append(part)
        else:
            ids += rng.integers(8, 240, part).tolist()
    return ids, images


def hf_greedy(model: Any, ids: list[int], images: list[str]) -> list[int]:
    pixels, grids = pixels_for(images)
    return reference_greedy(model, ids, pixels, grids, new=NEW, stop=STOP, image_id=IMAGE_TOKEN_ID)


@pytest.fixture(scope="module")
def model(converted) -> Any:
    return converted("tied_gqa2", "windowed")


CASES = {
    "text-only": [[9]],
    "one-image": [[4, "A", 3]],
    "two-images": [[3, "A", 2, "B", 4]],
    "padded-mixed-batch": [[5], [2, "A", 6], [3, "B", 1, "A", 2]],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_equals_hf_generate(model, case):
    rng = np.random.default_rng(sorted(CASES).index(case))
    rows = [row(rng, parts) for parts in CASES[case]]
    T = max(len(ids) for ids, _ in rows)
    ids = np.zeros((len(rows), T), np.int64)
    mask = np.zeros_like(ids)
    for b, (r, _) in enumerate(rows):  # right-padded: the sampler re-pads to the left itself
        ids[b, : len(r)], mask[b, : len(r)] = r, 1
    pixels, grids = pixels_for([name for _, images in rows for name in images])
    sampler = Sampler(model.config, stop_token_ids=[STOP], length_buckets=(64, 128))
    gen = sampler.generate_ids(
        model.params, ids, mask, SamplingParams(max_new_tokens=NEW, temperature=0),
        jax.random.key(0), pixel_values=pixels, image_grid_thw=grids, decode_text=False,
    )  # fmt: skip
    for b, (r, images) in enumerate(rows):
        ours = gen.samples[b][0]
        expected = hf_greedy(model.hf_model, r, images)
        assert ours.tokens.tolist() == expected, f"row {b}"
        assert ours.finish_reason == ("stop" if expected[-1] == STOP else "length")
