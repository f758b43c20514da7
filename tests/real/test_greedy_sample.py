"""Greedy `vlmgym-sample` on the real-weights checkpoint writes the text HF's
`generate(do_sample=False)` writes, in fp32, for a text prompt and an image prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from vlmgym_model.sample_cli import main

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    rgb = np.full((168, 224, 3), 235, np.uint8)
    rgb[30:120, 20:100] = (200, 30, 30)
    rgb[40:150, 130:200] = (30, 60, 200)
    path = tmp_path_factory.mktemp("img") / "shapes.png"
    Image.fromarray(rgb).save(path)
    return path


def hf_greedy_text(hf_model, hf_processor, prompt: str, image: Image.Image | None) -> str:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": prompt}]
    text = hf_processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True
    )
    inputs = hf_processor(text=[text], images=[image] if image else None, return_tensors="pt")
    with torch.no_grad():
        out = hf_model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS)
    new = out[0, inputs["input_ids"].shape[1] :]
    assert len(new) >= 8, "HF stopped almost at once: pick a prompt with a longer answer"
    return hf_processor.tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_greedy_cli_equals_hf_generate(
    real_dirs, hf_model, hf_processor, image_path, capsys, with_image
):
    prompt = (
        "Describe this picture in one long sentence."
        if with_image
        else "Write a Python function that checks whether a number is prime."
    )
    argv = ["--model_dir", str(real_dirs.model_dir), "--prompt", prompt, "--temperature", "0"]
    argv += ["--dtype", "float32", "--num_generation_tokens", str(NEW_TOKENS)]
    image = None
    if with_image:
        argv += ["--image", str(image_path)]
        with Image.open(image_path) as im:
            image = im.convert("RGB")
    assert main(argv) == 0
    ours = capsys.readouterr().out
    expected = hf_greedy_text(hf_model, hf_processor, prompt, image)
    assert ours == expected + "\n"
