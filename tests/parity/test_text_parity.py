"""The JAX text decoder against HF's Qwen2.5-VL on the same random weights, in fp32."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from fixtures.hf_models import TEXT_CONFIGS, VOCAB_SIZE
from vlmgym_model import forward

NAMES = sorted(TEXT_CONFIGS)


def hf_logits(model, ids: np.ndarray, position_ids: np.ndarray | None = None) -> np.ndarray:
    kwargs = {}
    if position_ids is not None:
        kwargs["position_ids"] = torch.as_tensor(position_ids, dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long), **kwargs)
    return out.logits.float().numpy()


def random_ids(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.integers(0, 240, size=shape)  # below the vision special tokens


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_hf(converted, tol, name):
    m = converted(name)
    ids = random_ids(np.random.default_rng(0), 2, 11)
    ours = np.asarray(forward(m.params, m.config, ids))
    ref = hf_logits(m.hf_model, ids)
    assert ours.shape == (2, 11, VOCAB_SIZE)
    np.testing.assert_allclose(ours, ref, atol=tol["float32"], rtol=0)
    assert np.abs(ref).max() > 1.0, "logits this small could hide errors"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_unpadded_rows(converted, tol, name, side):
    """Each row of a padded batch equals HF run on that row alone, at every real token."""
    m = converted(name)
    rng = np.random.default_rng(1)
    lengths = [11, 4, 8]
    T = max(lengths)
    ids = np.zeros((len(lengths), T), np.int64)
    mask = np.zeros_like(ids)
    rows = [random_ids(rng, n) for n in lengths]
    for b, row in enumerate(rows):
        sl = slice(T - len(row), T) if side == "left" else slice(0, len(row))
        ids[b, sl], mask[b, sl] = row, 1
    ours = np.asarray(forward(m.params, m.config, ids, mask))
    for b, row in enumerate(rows):
        ref = hf_logits(m.hf_model, row[None])[0]
        got = ours[b][mask[b] == 1]
        np.testing.assert_allclose(got, ref, atol=tol["float32"], rtol=0, err_msg=f"row {b}")


def distinct_3d_positions(rng: np.random.Generator, B: int, T: int) -> np.ndarray:
    """[3, B, T] positions whose t, h and w ids differ, as image tokens' do."""
    base = np.arange(T)[None, None, :]
    return (base + rng.integers(0, 5, size=(3, B, T))).astype(np.int64)


@pytest.mark.parametrize("name", NAMES)
def test_mrope_sections_match_hf(converted, tol, name):
    """Distinct (t, h, w) position ids exercise every mrope section."""
    m = converted(name)
    rng = np.random.default_rng(2)
    ids = random_ids(rng, 2, 9)
    pos = distinct_3d_positions(rng, 2, 9)
    ours = np.asarray(forward(m.params, m.config, ids, position_ids=pos))
    ref = hf_logits(m.hf_model, ids, pos)
    np.testing.assert_allclose(ours, ref, atol=tol["float32"], rtol=0)


def _with_text(config, **changes):
    return dataclasses.replace(config, text=dataclasses.replace(config.text, **changes))


@pytest.mark.parametrize(
    "change",
    [
        {"rope_theta": 10_000.0 + 1.0},
        {"mrope_section": (3, 3, 2)},
    ],
    ids=["rope_theta", "mrope_section"],
)
def test_wrong_rotary_settings_fail(converted, tol, change):
    """The comparison can fail: a wrong rotary setting moves logits far past the tolerance."""
    m = converted("tied_gqa2")
    if "rope_theta" in change and m.config.text.rope_theta == change["rope_theta"]:
        pytest.fail("the wrong theta must differ from the model's")
    rng = np.random.default_rng(3)
    ids = random_ids(rng, 2, 12)
    pos = distinct_3d_positions(rng, 2, 12)
    wrong = _with_text(m.config, **change)
    ours = np.asarray(forward(m.params, wrong, ids, position_ids=pos))
    ref = hf_logits(m.hf_model, ids, pos)
    assert np.abs(ours - ref).max() > 100 * tol["float32"]


def test_tied_model_has_no_lm_head(converted):
    assert converted("tied_gqa2").params.text.lm_head is None
    assert converted("untied_gqa4").params.text.lm_head is not None
