"""Tiny Qwen-VL-shaped models (any family) with a word-level tokenizer, for demos and tests.

A randomly initialised model must find a rewarded answer by chance before RL can teach it
anything. With Qwen's 151,936-token vocabulary that never happens; with a word-level
vocabulary of a few dozen words, where every answer word is one token, it does. The
tokenizer is a `tokenizers` WordLevel model (whitespace and punctuation split, unknown
words -> `<unk>`), followed by Qwen2.5-VL's 22 added tokens, so the chat template, the
image placeholders and the Processor work exactly as with a real checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# Qwen2.5-VL's chat template (chat_template.json of the Instruct checkpoints).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Each family's image processor settings (preprocessor_config.json).
_CLIP = {
    "patch_size": 14,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}
IMAGE_SETTINGS: dict[str, dict[str, Any]] = {
    "qwen2_vl": _CLIP,
    "qwen2_5_vl": _CLIP,
    "qwen3_vl": {"patch_size": 16, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
}

# Qwen2.5-VL's added tokens, in Qwen's order, with whether each is special.
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

UNK = "<unk>"
# The words of the chat template's default system prompt and role names.
TEMPLATE_WORDS = ("system", "user", "assistant", "You", "are", "a", "helpful", ".")


def split_words(text: str) -> list[str]:
    """The word-level pre-tokenisation: whitespace-separated runs, punctuation split off."""
    from tokenizers import pre_tokenizers

    pre = _pre_tokenizer(pre_tokenizers)
    return [w for w, _ in pre.pre_tokenize_str(text)]


def _pre_tokenizer(pre_tokenizers: Any) -> Any:
    return pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )


def write_word_tokenizer(
    directory: str | Path,
    texts: Iterable[str],
    *,
    chat_template: str = QWEN2_5_VL_CHAT_TEMPLATE,
    min_pixels: int = 3136,
    max_pixels: int = 200_704,
    family: str = "qwen2_5_vl",
    phrases: Iterable[str] = (),
) -> dict[str, int]:
    """Write tokenizer.json, tokenizer_config.json, chat_template.json, generation_config.json
    and preprocessor_config.json for a word-level vocabulary covering `texts`.

    The image processor settings are the family's: patch 14 and CLIP's mean/std
    (Qwen2-VL, Qwen2.5-VL), or patch 16 and mean = std = 0.5 (Qwen3-VL).

    Every word of `texts` (and of the chat template's system prompt) gets one token, in
    first-seen order after `<unk>` (id 0); Qwen's added tokens follow, then one added,
    non-special token per distinct string of `phrases` (e.g. a whole tool call,
    `vlmgym_envs.ToolEnv.tool_phrases`): text containing a phrase encodes it as that one
    token, and decoding the token gives the phrase back verbatim.

    Returns:
      {token: id} for the whole vocabulary.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {UNK: 0}
    for text in (" ".join(TEMPLATE_WORDS), *texts):
        for word in split_words(text):
            vocab.setdefault(word, len(vocab))
    for content, _ in QWEN_ADDED_TOKENS:
        vocab[content] = len(vocab)
    phrase_list = [p for p in dict.fromkeys(phrases) if p and p not in vocab]
    for phrase in phrase_list:
        vocab[phrase] = len(vocab)
    tokenizer = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = _pre_tokenizer(pre_tokenizers)
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    # `add_special_tokens` marks every token it adds special (decoding with
    # skip_special_tokens would drop `<tool_call>`), so the non-special ones go to `add_tokens`
    added = [(AddedToken(c, special=sp, normalized=False), sp) for c, sp in QWEN_ADDED_TOKENS]
    tokenizer.add_special_tokens([token for token, special in added if special])
    tokenizer.add_tokens([token for token, special in added if not special])
    tokenizer.add_tokens([AddedToken(p, special=False, normalized=False) for p in phrase_list])
    tokenizer.save(str(directory / "tokenizer.json"))
    configs = {
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": UNK,
            "bos_token": None,
            "model_max_length": 32768,
        },
        "chat_template.json": {"chat_template": chat_template},
        "generation_config.json": {
            "eos_token_id": [vocab["<|im_end|>"], vocab["<|endoftext|>"]],
            "pad_token_id": vocab["<|endoftext|>"],
        },
        "preprocessor_config.json": {
            "image_processor_type": "Qwen2VLImageProcessor",
            "min_pixels": min_pixels,
            "max_pixels": max_pixels,
            "temporal_patch_size": 2,
            "merge_size": 2,
            **IMAGE_SETTINGS[family],
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "do_resize": True,
            "do_convert_rgb": True,
        },
    }
    for name, content in configs.items():
        (directory / name).write_text(json.dumps(content, indent=2) + "\n")
    return vocab


def tiny_config_dict(
    vocab: dict[str, int],
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vision_depth: int = 2,
    vision_hidden_size: int = 32,
    vision_heads: int = 2,
    fullatt_block_indexes: Sequence[int] = (1,),
    family: str = "qwen2_5_vl",
) -> dict[str, Any]:
    """A `config.json` (the family's published layout) for a tiny model over `vocab`.

    Qwen2-VL and Qwen3-VL towers attend over whole images (no windows);
    Qwen3-VL's taps every vision block for DeepStack (as many as the decoder has layers)
    and has an 8 x 8 learned position table.
    """
    head_dim = hidden_size // num_attention_heads
    half = head_dim // 2
    t = half // 4
    section = [t, (half - t) // 2, half - t - (half - t) // 2]
    if family != "qwen2_5_vl":
        return _family_config_dict(
            vocab,
            family,
            text=dict(
                vocab_size=len(vocab),
                hidden_size=hidden_size,
                intermediate_size=intermediate_size,
                num_hidden_layers=num_hidden_layers,
                num_attention_heads=num_attention_heads,
                num_key_value_heads=num_key_value_heads,
                rope_theta=10000.0,
                mrope_section=tuple(section),
                tie_word_embeddings=True,
                max_position_embeddings=4096,
            ),
            vision=dict(
                depth=vision_depth,
                hidden_size=vision_hidden_size,
                intermediate_size=2 * vision_hidden_size,
                num_heads=vision_heads,
                out_hidden_size=hidden_size,
            ),
        )
    return _qwen2_5_config_dict(
        vocab, section, vision_depth, vision_hidden_size, vision_heads, fullatt_block_indexes,
        hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
    )  # fmt: skip


def _qwen2_5_config_dict(
    vocab: dict[str, int],
    section: list[int],
    vision_depth: int,
    vision_hidden_size: int,
    vision_heads: int,
    fullatt_block_indexes: Sequence[int],
    **text: int,
) -> dict[str, Any]:
    """Qwen2.5-VL's published flat layout."""
    hidden_size = text["hidden_size"]
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "vocab_size": len(vocab),
        **text,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": section},
        "tie_word_embeddings": True,
        "max_position_embeddings": 4096,
        "hidden_act": "silu",
        "image_token_id": vocab["<|image_pad|>"],
        "video_token_id": vocab["<|video_pad|>"],
        "vision_start_token_id": vocab["<|vision_start|>"],
        "vision_end_token_id": vocab["<|vision_end|>"],
        "bos_token_id": None,
        "eos_token_id": vocab["<|im_end|>"],
        "vision_config": {
            "depth": vision_depth,
            "hidden_size": vision_hidden_size,
            "intermediate_size": 2 * vision_hidden_size,
            "num_heads": vision_heads,
            "in_chans": 3,
            "out_hidden_size": hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": list(fullatt_block_indexes),
            "tokens_per_second": 2,
            "hidden_act": "silu",
        },
    }


def _family_config_dict(
    vocab: dict[str, int], family: str, text: dict[str, Any], vision: dict[str, Any]
) -> dict[str, Any]:
    from vlmgym_model.qwen2_5_vl.config import Qwen2_5_VLConfig, TextConfig, VisionConfig

    qwen3 = family == "qwen3_vl"
    depth = vision["depth"]
    vision_config = VisionConfig(
        **vision,
        window_size=0,
        fullatt_block_indexes=(),
        norm="layer",
        patch_size=IMAGE_SETTINGS[family]["patch_size"],
        hidden_act="gelu_pytorch_tanh" if qwen3 else "quick_gelu",
        patch_bias=qwen3,
        num_position_embeddings=64 if qwen3 else 0,
        deepstack_visual_indexes=tuple(range(min(depth, text["num_hidden_layers"])))
        if qwen3
        else (),
    )
    text_config = TextConfig(
        **text, attention_bias=not qwen3, qk_norm=qwen3, mrope_interleaved=qwen3
    )
    config = Qwen2_5_VLConfig(
        text=text_config,
        vision=vision_config,
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
        bos_token_id=None,
        eos_token_id=vocab["<|im_end|>"],
        model_type=family,
    )
    return config.to_hf_dict()


def write_tiny_model(
    directory: str | Path,
    texts: Iterable[str],
    *,
    seed: int = 0,
    init_scale: float = 0.02,
    vision_init_scale: float | None = None,
    family: str = "qwen2_5_vl",
    phrases: Iterable[str] = (),
    **config_overrides: Any,
) -> Path:
    """Write a whole tiny model directory of `family` (see `config.FAMILIES`): word
    tokenizer, config.json and random params.

    Args:
      texts: text the tokenizer must cover (prompts and answer words).
      phrases: strings that get one token each (see `write_word_tokenizer`).
      init_scale: std of the random weight matrices.
      vision_init_scale: std of the vision tower's matrices (default: init_scale). A larger
        one makes image features stand out against token embeddings from the start.
      **config_overrides: passed to `tiny_config_dict` (sizes).
    """
    import jax

    from vlmgym_model.checkpoint import save_model
    from vlmgym_model.qwen2_5_vl.config import Qwen2_5_VLConfig
    from vlmgym_model.qwen2_5_vl.model import init_random_params

    directory = Path(directory)
    vocab = write_word_tokenizer(directory, texts, family=family, phrases=phrases)
    raw = tiny_config_dict(vocab, family=family, **config_overrides)
    (directory / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    config = Qwen2_5_VLConfig.from_hf_dict(raw)
    params = init_random_params(config, jax.random.key(seed), scale=init_scale)
    if vision_init_scale is not None:
        vision = init_random_params(config, jax.random.key(seed + 1), scale=vision_init_scale)
        params = dataclasses.replace(params, vision=vision.vision)
    save_model(directory, config, params, force=True)
    return directory
