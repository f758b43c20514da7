"""HF -> vlm-gym -> HF: the exported checkpoint loads in transformers with the same logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration
from vlmgym_convert import jax_to_hf
from vlmgym_convert.safetensors_io import open_checkpoint


@pytest.mark.parametrize("name", ["tied_gqa2", "untied_gqa4"])
def test_export_reloads_in_transformers(converted, tmp_path, name):
    m = converted(name)
    out = jax_to_hf(m.model_dir, tmp_path / "exported", progress=False)
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).float().eval()
    ids = torch.as_tensor(np.random.default_rng(0).integers(0, 240, (2, 10)))
    with torch.no_grad():
        ref = m.hf_model(input_ids=ids).logits.numpy()
        got = reloaded(input_ids=ids).logits.numpy()
    np.testing.assert_array_equal(got, ref)  # an fp32 copy is exact
    # Every tensor, vision included, survives unchanged.
    original = open_checkpoint(m.hf_dir)
    exported = open_checkpoint(out)
    assert set(exported) == set(original)
    for key, f in original.items():
        np.testing.assert_array_equal(exported[key].get(key), f.get(key), err_msg=key)
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_5_vl"


def test_export_shards_large_checkpoints(converted, tmp_path):
    m = converted("untied_gqa4")
    out = jax_to_hf(m.model_dir, tmp_path / "sharded", max_shard_bytes=64_000, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).float().eval()
    ids = torch.as_tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        np.testing.assert_array_equal(
            reloaded(input_ids=ids).logits.numpy(), m.hf_model(input_ids=ids).logits.numpy()
        )
