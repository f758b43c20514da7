"""The tokenizer.json built from the GGUF equals HF's Qwen2 tokenizer built from the same
vocab.json and merges.txt (which the fixture also writes from the GGUF)."""

from __future__ import annotations

import json
import shutil

import pytest
from tokenizers import Tokenizer

CORPUS = [
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < 10; ++i) {\n\tprintf("%d\\n", i);\n}',
    "import numpy as np\r\n\r\nx = np.zeros((3, 4), dtype=np.float32)  # [B, T]",
    "Hello, world! It's a test: don't, won't, we'll, they've, I'd, you're.",
    "数字 12345678901234567890 and 3.14159e-10, -42, 1,000,000 and ١٢٣",
    "中文测试\uff1a你好\uff0c世界\uff01日本語のテキスト、한국어 텍스트.",
    "emoji 🙂👍🏽 🇫🇷 👨‍👩‍👧 and symbols ∑∫√∞ ≠ ≤ ≥ → ← ©®™",
    "Ünïcödé çàfé naïve Straße Ελληνικά русский العربية हिन्दी",
    "   leading spaces, trailing spaces   \n\n\n\t\t  mixed   \t whitespace\n \n",
    "\n\n\n\n",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>",
    "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>What is this?<|endoftext|>",
    '<tool_call>{"name": "f"}</tool_call><|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>',
    "not special: <|im_start and |im_end|> and <|unknown|>",
    "",
]


@pytest.fixture(scope="module")
def tokenizers_pair(real_dirs, tmp_path_factory):
    """(ours, HF's): our tokenizer.json, and Qwen2Tokenizer loaded from a directory holding
    only vocab.json, merges.txt and tokenizer_config.json (so HF builds it from those)."""
    from transformers import Qwen2TokenizerFast

    slow_dir = tmp_path_factory.mktemp("vocab-merges")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(real_dirs.hf_dir / name, slow_dir / name)
    ref = Qwen2TokenizerFast.from_pretrained(slow_dir)
    ours = Tokenizer.from_file(str(real_dirs.hf_dir / "tokenizer.json"))
    return ours, ref


def rendered_chat_prompt(real_dirs) -> str:
    from vlmgym_model import Processor

    processor = Processor.from_model_dir(real_dirs.model_dir)
    messages = [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": [{"type": "text", "text": "Sort a list in place."}]},
        {"role": "assistant", "content": "Use `xs.sort()`."},
        {"role": "user", "content": [{"type": "text", "text": "And reversed?"}]},
    ]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def test_vocab_is_qwens(real_dirs, tokenizers_pair):
    ours, ref = tokenizers_pair
    vocab = json.loads((real_dirs.hf_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 151_643
    assert ours.get_vocab_size(with_added_tokens=True) == 151_665
    for token, i in (("<|image_pad|>", 151_655), ("<|im_end|>", 151_645)):
        assert ours.token_to_id(token) == i == ref.convert_tokens_to_ids(token)
    assert ours.token_to_id("[PAD151665]") is None  # the GGUF's unused filler rows


def test_same_ids_and_decode_as_hf(real_dirs, tokenizers_pair):
    ours, ref = tokenizers_pair
    texts = [*CORPUS, rendered_chat_prompt(real_dirs)]
    assert "<|im_start|>assistant\n" in texts[-1]
    for text in texts:
        got = ours.encode(text, add_special_tokens=False).ids
        want = ref(text, add_special_tokens=False)["input_ids"]
        assert got == want, text
        assert ours.decode(got, skip_special_tokens=False) == ref.decode(want) == text
        assert ours.decode(got, skip_special_tokens=True) == ref.decode(
            want, skip_special_tokens=True
        ), text
    # multi-token words and a special token, so the comparison is not trivially all-bytes
    ids = ours.encode("<|im_start|>assistant\ndef main():", add_special_tokens=False).ids
    assert ids[0] == 151_644 and len(ids) < len("assistant\ndef main():") // 2
