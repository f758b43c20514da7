"""Our `Processor` against HF's `Qwen2_5_VLProcessor` on a tiny Qwen-style tokenizer.

HF's processor needs a video processor (and so torchvision) to construct; `HFReference` is a
test-only subclass that takes none, with the torch-free `Qwen2VLImageProcessorPil`.
Token ids, masks, `mm_token_type_ids` and grids must be equal; pixels within the "image" tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import numpy as np
import pytest
from fixtures.tokenizer import QWEN2_5_VL_CHAT_TEMPLATE, write_tiny_tokenizer
from PIL import Image
from transformers import AutoTokenizer, Qwen2VLImageProcessorPil
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from vlmgym_model.chat_template import compile_chat_template
from vlmgym_model.processing import Processor

MAX_PIXELS = 28 * 28 * 64  # keeps image token counts small (at most 64 per image)


class HFReference(Qwen2_5_VLProcessor):
    """HF's Qwen2.5-VL processor without a video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def build_hf(model_dir: Path, chat_template: str) -> HFReference:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(model_dir)
    return HFReference(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-tokenizer")
    write_tiny_tokenizer(path, max_pixels=MAX_PIXELS)
    return path


@pytest.fixture(scope="module")
def ours(model_dir) -> Processor:
    return Processor.from_model_dir(model_dir)


@pytest.fixture(scope="module")
def hf(model_dir) -> HFReference:
    return build_hf(model_dir, QWEN2_5_VL_CHAT_TEMPLATE)


def image(seed: int, height: int, width: int, mode: str = "RGB") -> Image.Image:
    data = np.random.default_rng(seed).integers(0, 256, size=(height, width, 4), dtype=np.uint8)
    return Image.fromarray(data if mode == "RGBA" else data[..., :3], mode)


def user(*blocks, text: str | None = None) -> dict:
    content = list(blocks) + ([{"type": "text", "text": text}] if text is not None else [])
    return {"role": "user", "content": content}


def img(seed: int, height: int = 100, width: int = 150, mode: str = "RGB") -> dict:
    return {"type": "image", "image": image(seed, height, width, mode)}


def hf_process(
    hf: HFReference,
    messages,
    add_generation_prompt=True,
    padding_side="left",
    template_kwargs=None,
    **processor_kwargs,
):
    out = hf.apply_chat_template(
        messages,
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        return_dict=True,
        return_tensors="np",
        processor_kwargs={"padding": True, "padding_side": padding_side, **processor_kwargs},
        **(template_kwargs or {}),
    )
    return {k: np.asarray(v) for k, v in out.items()}


def assert_same(ours_out: dict, hf_out: dict, tol: dict) -> None:
    assert set(hf_out) <= set(ours_out)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        assert ours_out[key].dtype == np.int32
        np.testing.assert_array_equal(ours_out[key], hf_out[key], err_msg=key)
    if "pixel_values" in hf_out:
        np.testing.assert_array_equal(ours_out["image_grid_thw"], hf_out["image_grid_thw"])
        assert ours_out["pixel_values"].dtype == np.float32
        np.testing.assert_allclose(
            ours_out["pixel_values"], hf_out["pixel_values"], rtol=0, atol=tol["image"]
        )
    else:
        assert ours_out["pixel_values"] is None and ours_out["image_grid_thw"] is None


CONVERSATIONS = {
    "one_image": [user(img(0), text="What is the color?")],
    "several_images_one_turn": [
        user(img(1, 56, 56), img(2, 300, 60), img(3, 200, 200, "RGBA"), text="Compare them.")
    ],
    "text_between_images": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "First:"},
                img(4),
                {"type": "text", "text": " and second:"},
                img(5, 40, 400),
                {"type": "text", "text": " same shape?"},
            ],
        }
    ],
    "several_turns": [
        user(img(6), text="What is in this image?"),
        {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
        user(img(7, 90, 180), text="And this one?"),
        {"role": "assistant", "content": "A blue circle."},
        user(text="Which is bigger?"),
    ],
    "system_prompt": [
        {"role": "system", "content": "You are a GeoGuessr expert. Answer with one country."},
        user(img(8, 256, 512), text="Where was this taken?"),
    ],
    "system_prompt_as_blocks": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        user(img(9), text="Describe."),
    ],
    "text_only_string_content": [{"role": "user", "content": "hello, héllo, 你好 123 !?"}],
    "text_only_blocks": [user(text="What is the answer?\nAnswer with one word.")],
    "image_only": [user(img(10, 28, 28))],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_single_conversation_matches_hf(ours, hf, tol, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    assert ours.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt
    ) == hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    out = ours(messages, add_generation_prompt=add_generation_prompt)
    assert_same(out, hf_process(hf, messages, add_generation_prompt), tol)
    assert out["input_ids"].shape[0] == 1


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_with_padding_matches_hf(ours, hf, tol, padding_side):
    batch = [CONVERSATIONS[name] for name in sorted(CONVERSATIONS)]
    out = ours(batch, padding_side=padding_side)
    assert_same(out, hf_process(hf, batch, padding_side=padding_side), tol)
    lengths = out["attention_mask"].sum(axis=1)
    assert len(set(lengths.tolist())) > 1  # the batch really needs padding
    pad_column = 0 if padding_side == "left" else -1
    assert (out["input_ids"][lengths < lengths.max(), pad_column] == ours.pad_token_id).all()


def test_pad_to_multiple_of_matches_hf(ours, hf, tol):
    batch = [CONVERSATIONS["one_image"], CONVERSATIONS["text_only_blocks"]]
    out = ours(batch, padding_side="left", pad_to_multiple_of=64)
    assert out["input_ids"].shape[1] % 64 == 0
    assert_same(out, hf_process(hf, batch, padding_side="left", pad_to_multiple_of=64), tol)


def test_image_placeholders_expand_to_merged_token_count(ours):
    messages = [user(img(1, 56, 56), img(2, 300, 60), text="Two images.")]
    out = ours(messages)
    grid = out["image_grid_thw"]
    per_image = grid.prod(axis=1) // 4
    ids = out["input_ids"][0]
    assert (ids == ours.image_token_id).sum() == per_image.sum()
    np.testing.assert_array_equal(out["mm_token_type_ids"][0], (ids == ours.image_token_id))
    # Each image's placeholders form one run between <|vision_start|> and <|vision_end|>.
    starts = np.flatnonzero(ids == ours.tokenizer.token_to_id("<|vision_start|>"))
    for start, count in zip(starts, per_image, strict=True):
        assert (ids[start + 1 : start + 1 + count] == ours.image_token_id).all()
        assert ids[start + 1 + count] == ours.tokenizer.token_to_id("<|vision_end|>")


def test_text_prompt_with_explicit_images_matches_hf(ours, hf, tol):
    images = [image(20, 120, 80), image(21, 64, 64)]
    prompts = [
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What?<|im_end|>\n",
        "<|vision_start|><|image_pad|><|vision_end|> and text",
    ]
    out = ours(prompts, images=images, padding_side="right")
    theirs = hf(
        text=prompts, images=images, padding=True, padding_side="right", return_tensors="np"
    )
    assert_same(out, {k: np.asarray(v) for k, v in theirs.items()}, tol)
    single = ours(prompts[0], images=images[:1])
    theirs = hf(text=prompts[0], images=images[:1], return_tensors="np")
    assert_same(single, {k: np.asarray(v) for k, v in theirs.items()}, tol)


def test_image_blocks_without_data_take_images_argument(ours, hf, tol):
    messages = [user({"type": "image"}, {"type": "image"}, text="Two.")]
    images = [image(30, 70, 70), image(31, 140, 70)]
    out = ours(messages, images=images)
    prompt = hf.apply_chat_template(messages, add_generation_prompt=True)
    theirs = hf(text=prompt, images=images, return_tensors="np")
    assert_same(out, {k: np.asarray(v) for k, v in theirs.items()}, tol)


def test_image_from_path_matches_hf(ours, hf, tol, tmp_path):
    path = tmp_path / "picture.png"
    image(40, 77, 133, "RGBA").save(path)
    messages = [user({"type": "image", "path": str(path)}, text="From disk.")]
    assert_same(ours(messages), hf_process(hf, messages), tol)


def test_template_variables_match_hf(ours, hf):
    messages = CONVERSATIONS["several_images_one_turn"]
    rendered = ours.apply_chat_template(messages, add_vision_id=True)
    assert "Picture 2: " in rendered
    assert rendered == hf.apply_chat_template(
        messages, add_generation_prompt=True, add_vision_id=True
    )


@pytest.mark.parametrize(
    "location", ["chat_template.json", "chat_template.jinja", "tokenizer_config"]
)
def test_template_locations(tmp_path, location, ours):
    write_tiny_tokenizer(tmp_path, template_location=location, max_pixels=MAX_PIXELS)
    loaded = Processor.from_model_dir(tmp_path)
    messages = CONVERSATIONS["several_turns"]
    assert loaded.apply_chat_template(messages) == ours.apply_chat_template(messages)


# A template exercising what HF's environment provides: whitespace control with trim_blocks and
# lstrip_blocks, tojson without HTML escaping, namespace, loop controls, raise_exception, the
# named special tokens and the {% generation %} tag.
FEATURE_TEMPLATE = """{%- if tools %}
{{- '<|im_start|>system\\n# Tools\\n' }}
    {%- for tool in tools %}
{{ tool | tojson }}
    {%- endfor %}
{{- '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(turns=0) %}
{% for message in messages %}
    {% if message.role not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('Unknown role: ' + message.role) }}
    {% endif %}
    {% if message.role == 'system' and loop.index0 > 0 %}{% continue %}{% endif %}
    {% set ns.turns = ns.turns + 1 %}
<|im_start|>{{ message.role }}
    {% if message.content is string %}
{{ message.content }}
    {% else %}
        {% for block in message.content %}
            {% if block.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>
            {%- elif block.type == 'text' %}{{ block.text }}{% endif %}
        {% endfor %}
    {% endif %}
    {% if message.role == 'assistant' %}
{% generation %}{{ eos_token }}{% endgeneration %}
    {% endif %}
<|im_end|>
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant turn={{ ns.turns }}
{% endif %}"""


def test_template_features_match_hf(model_dir, tol):
    ours = Processor(
        Processor.from_model_dir(model_dir).tokenizer,
        FEATURE_TEMPLATE,
        special_tokens={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    )
    hf = build_hf(model_dir, FEATURE_TEMPLATE)
    tools = [{"name": "geo", "description": "Ünïcode & <html>", "parameters": {"x": 1}}]
    messages = [
        {"role": "system", "content": "sys"},
        user(img(50), text="Where?"),
        {"role": "assistant", "content": "France", "tool_calls": None},
        {"role": "system", "content": "skipped by continue"},
        user(text="Sure?"),
    ]
    for generation_prompt in (True, False):
        rendered = ours.apply_chat_template(messages, generation_prompt, tools=tools)
        assert rendered == hf.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tools=tools
        )
    assert "Ünïcode & <html>" in rendered
    assert_same(
        ours(messages, tools=tools), hf_process(hf, messages, template_kwargs={"tools": tools}), tol
    )
    bad = [{"role": "robot", "content": "beep"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="Unknown role: robot"):
        ours.apply_chat_template(bad)
    with pytest.raises(jinja2.exceptions.TemplateError, match="Unknown role: robot"):
        hf.apply_chat_template(bad)


def test_sandbox_blocks_unsafe_templates():
    template = compile_chat_template("{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        template.render(messages=[])
    template = compile_chat_template("{% set ns = namespace() %}{% set ns._x = 1 %}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        template.render()


def test_decode_matches_hf(ours, hf):
    messages = [CONVERSATIONS["several_turns"], CONVERSATIONS["text_only_string_content"]]
    ids = ours(messages, padding_side="right")["input_ids"]
    for skip in (False, True):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == hf.batch_decode(
            ids.tolist(), skip_special_tokens=skip
        )
        assert ours.decode(ids[1], skip_special_tokens=skip) == hf.decode(
            ids[1].tolist(), skip_special_tokens=skip
        )
    assert "hello, héllo, 你好 123 !?" in ours.decode(ids[1], skip_special_tokens=True)


def test_token_ids(ours, hf, model_dir):
    assert ours.image_token_id == hf.image_token_id == ours.tokenizer.token_to_id("<|image_pad|>")
    assert ours.video_token_id == hf.video_token_id
    assert ours.pad_token_id == hf.tokenizer.pad_token_id
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert list(ours.eos_token_ids) == generation["eos_token_id"]
    assert ours.tokenizer.get_vocab_size() == 512


def test_eos_falls_back_to_tokenizer_config(tmp_path, hf):
    write_tiny_tokenizer(tmp_path, write_generation_config=False)
    assert Processor.from_model_dir(tmp_path).eos_token_ids == (hf.tokenizer.eos_token_id,)


def test_clear_errors(ours, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Processor.from_model_dir(tmp_path)
    write_tiny_tokenizer(tmp_path)
    (tmp_path / "chat_template.json").unlink()
    with pytest.raises(FileNotFoundError, match="no chat template"):
        Processor.from_model_dir(tmp_path)
    with pytest.raises(ValueError, match="carry no image"):
        ours([user({"type": "image"}, text="Where is my image?")])
    with pytest.raises(ValueError, match=r"2 <\|image_pad\|> placeholder\(s\) but 1 image"):
        ours("<|image_pad|> and <|image_pad|>", images=[image(1, 56, 56)])
    with pytest.raises(ValueError, match=r"0 <\|image_pad\|> placeholder\(s\) but 1 image"):
        ours("no placeholder", images=[image(1, 56, 56)])
    with pytest.raises(ValueError, match="both inside the messages"):
        ours(CONVERSATIONS["one_image"], images=[image(1, 56, 56)])
    with pytest.raises(ValueError, match="not fetched"):
        ours([user({"type": "image", "url": "https://example.com/a.png"})])
    with pytest.raises(ValueError, match="video"):
        ours([user({"type": "video", "video": "clip.mp4"}, text="What happens?")])
    with pytest.raises(ValueError, match="padding_side"):
        ours(CONVERSATIONS["one_image"], padding_side="middle")


# ---------------------------------------------------------------- Qwen3-VL's image settings


class HFQwen3Reference(Qwen3VLProcessor):
    """HF's Qwen3-VL processor without a video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


QWEN3_VL_IMAGES = {
    # Qwen3-VL's preprocessor_config.json: patch 16 (side factor 32), mean = std = 0.5,
    # pixel bounds as size {shortest_edge, longest_edge}; a small budget keeps tokens few.
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "size": {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 64},
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen3VLProcessor",
}


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-qwen3-tokenizer")
    write_tiny_tokenizer(path)
    (path / "preprocessor_config.json").write_text(json.dumps(QWEN3_VL_IMAGES))
    return path


@pytest.mark.parametrize("name", ["one_image", "several_images_one_turn", "text_between_images"])
def test_qwen3_vl_image_settings_match_hf(qwen3_dir, tol, name):
    """Pixels (patch 16, mean/std 0.5), grids, ids and masks equal HF's Qwen3-VL processor."""
    ours = Processor.from_model_dir(qwen3_dir)
    assert ours.image_processor.config.patch_size == 16
    hf = HFQwen3Reference(
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(qwen3_dir),
        tokenizer=AutoTokenizer.from_pretrained(qwen3_dir),
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )
    messages = CONVERSATIONS[name]
    out = ours(messages)
    assert out["pixel_values"].shape[1] == 3 * 2 * 16 * 16
    assert_same(out, hf_process(hf, messages), tol)
