"""Qwen2-VL on real weights: the real Qwen2.5-Coder-0.5B decoder (the same Qwen2 decoder
Qwen2-VL uses) under a random Qwen2-VL vision tower (LayerNorm, QuickGELU, no windows).

The checkpoint is written by HF's own `Qwen2VLForConditionalGeneration` (so the tensor names
and config layout are the published ones), converted with `hf_to_jax`, and compared with
HF in float64 on a chat prompt with an image and one without (see test_logits.py for why
float64). Qwen3-VL has no real weights here: no Qwen3 decoder is fetchable from PyPI.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from fixtures.real_model import IMAGE_TOKEN_ID
from PIL import Image, ImageDraw
from vlmgym_convert import hf_to_jax
from vlmgym_convert.safetensors_io import open_checkpoint
from vlmgym_model import forward, load_model

SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.json",
              "preprocessor_config.json", "generation_config.json")  # fmt: skip


def drawn_image() -> Image.Image:
    """A 196x140 drawing: 14x10 patches, 35 merged image tokens."""
    image = Image.new("RGB", (196, 140), (235, 240, 220))
    draw = ImageDraw.Draw(image)
    draw.rectangle((10, 20, 90, 110), fill=(30, 160, 60))
    draw.ellipse((100, 30, 180, 130), fill=(200, 40, 120))
    return image


def user(text: str, image: bool) -> dict[str, Any]:
    content = [{"type": "image"}] if image else []
    return {"role": "user", "content": [*content, {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def qwen2_vl(real_dirs, tmp_path_factory) -> Any:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    root = tmp_path_factory.mktemp("qwen2-vl-real")
    raw = json.loads((real_dirs.hf_dir / "config.json").read_text())
    text = {k: raw[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                "rms_norm_eps", "max_position_embeddings")}  # fmt: skip
    section = raw["rope_scaling"]["mrope_section"]
    text["rope_parameters"] = {"rope_type": "default", "mrope_section": section,
                               "rope_theta": raw["rope_theta"]}  # fmt: skip
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=dict(
            depth=2, embed_dim=64, mlp_ratio=2, num_heads=4, hidden_size=raw["hidden_size"]
        ),
        tie_word_embeddings=raw["tie_word_embeddings"],
        **{
            k: raw[k]
            for k in (
                "image_token_id",
                "video_token_id",
                "vision_start_token_id",
                "vision_end_token_id",
                "bos_token_id",
                "eos_token_id",
            )
        },
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).float().eval()
    real = open_checkpoint(real_dirs.hf_dir)
    names = {"model.": "model.language_model.", "lm_head.": "lm_head."}
    state = {}
    for name, f in real.items():
        for old, new in names.items():
            if name.startswith(old) and not name.startswith("model.visual"):
                state[new + name[len(old) :]] = torch.from_numpy(np.asarray(f.get(name)))
    missing, _ = model.load_state_dict(state, strict=False)
    assert all("visual" in k for k in missing), missing  # every text weight is the real one
    model.save_pretrained(root / "hf")
    for name in SIDE_FILES:
        shutil.copy(real_dirs.hf_dir / name, root / "hf" / name)
    hf_to_jax(root / "hf", root / "jax", progress=False)
    config, params = load_model(root / "jax", dtype=jnp.float32)
    return model, config, params


@pytest.mark.parametrize("image", [True, False], ids=["image", "text"])
def test_qwen2_vl_logits_match_hf_on_real_text_weights(qwen2_vl, hf_processor, tol, image):
    model, config, params = qwen2_vl
    assert config.model_type == "qwen2_vl"
    messages = [user("What shapes are in this image?" if image else "Reverse a list.", image)]
    text = hf_processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = hf_processor(text=[text], images=[drawn_image()] if image else None,
                          return_tensors="pt")  # fmt: skip
    assert ((inputs["input_ids"] == IMAGE_TOKEN_ID).sum() > 0) == image
    arrays = {k: v.numpy() for k, v in inputs.items()}
    ours = np.asarray(
        forward(params, config, arrays["input_ids"], arrays["attention_mask"],
                arrays.get("pixel_values"), arrays.get("image_grid_thw"))
    )  # fmt: skip
    with torch.no_grad():
        ref32 = model(**inputs).logits[0].numpy()
        model.double()
        try:
            kwargs = dict(inputs)
            if image:
                kwargs["pixel_values"] = inputs["pixel_values"].double()
            ref = model(**kwargs).logits[0].numpy()
        finally:
            model.float()
    err, hf_err = np.abs(ours[0] - ref).max(), np.abs(ref32 - ref).max()
    print(f"\nmax |logit| {np.abs(ref).max():.1f}; max abs error vs HF fp64: ours {err:.2e}, "
          f"HF's own fp32 model {hf_err:.2e}")  # fmt: skip
    assert np.abs(ref).max() > 10, "real logits are large; these look random"
    assert err <= tol["float32"]  # measured: 9.3e-5 (image), 8.3e-5 (text)
