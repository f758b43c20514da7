"""Tiny Qwen2.5-VL-shaped models with a word-level tokenizer, for demos and learning tests.

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
) -> dict[str, int]:
    """Write tokenizer.json, tokenizer_config.json, chat_template.json, generation_config.json
    and preprocessor_config.json for a word-level vocabulary covering `texts`.

    Every word of `texts` (and of the chat template's system prompt) gets one token, in
    first-seen order after `<unk>` (id 0); Qwen's added tokens follow.

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
    tokenizer = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = _pre_tokenizer(pre_tokenizers)
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer.add_special_tokens(
        [
            AddedToken(content, special=special, normalized=False)
            for content, special in QWEN_ADDED_TOKENS
        ]
    )
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
            "patch_size": 14,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
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
) -> dict[str, Any]:
    """A Qwen2.5-VL `config.json` (published flat layout) for a tiny model over `vocab`."""
    head_dim = hidden_size // num_attention_heads
    half = head_dim // 2
    t = half // 4
    section = [t, (half - t) // 2, half - t - (half - t) // 2]
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "vocab_size": len(vocab),
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
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


def write_tiny_model(
    directory: str | Path,
    texts: Iterable[str],
    *,
    seed: int = 0,
    init_scale: float = 0.02,
    vision_init_scale: float | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a whole tiny model directory: word tokenizer, config.json and random params.

    Args:
      texts: text the tokenizer must cover (prompts and answer words).
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
    vocab = write_word_tokenizer(directory, texts)
    raw = tiny_config_dict(vocab, **config_overrides)
    (directory / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    config = Qwen2_5_VLConfig.from_hf_dict(raw)
    params = init_random_params(config, jax.random.key(seed), scale=init_scale)
    if vision_init_scale is not None:
        vision = init_random_params(config, jax.random.key(seed + 1), scale=vision_init_scale)
        params = dataclasses.replace(params, vision=vision.vision)
    save_model(directory, config, params, force=True)
    return directory
