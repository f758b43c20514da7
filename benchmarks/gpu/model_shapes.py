"""The models the sampler and GRPO checks build in memory: random weights, no files.

"3b": Qwen2.5-VL-3B-Instruct's text decoder as its config.json has it (width 2048, 36
layers, 16 query / 2 kv heads of 128, MLP 11008, vocabulary 151,936, tied embeddings).
The vision tower is cut to one small block: these checks feed text only, and it is the
decoder that decoding and training spend their time in.
"smoke": a tiny decoder of the same structure, for the CPU smoke run.
"""

from __future__ import annotations

from typing import Any

import jax
from vlmgym_model import Qwen2_5_VLConfig, TextConfig, VisionConfig, init_random_params

TEXT_SHAPES: dict[str, dict[str, Any]] = {
    "3b": dict(
        vocab_size=151_936,
        hidden_size=2048,
        intermediate_size=11_008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        mrope_section=(16, 24, 24),
    ),
    "smoke": dict(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mrope_section=(4, 6, 6),
    ),
}


def model_config(name: str) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config with the text shape `name` and a one-block vision tower."""
    shape = TEXT_SHAPES[name]
    text = TextConfig(**shape, rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=True)
    vision = VisionConfig(
        depth=1,
        hidden_size=64,
        intermediate_size=128,
        num_heads=2,
        out_hidden_size=text.hidden_size,
        fullatt_block_indexes=(0,),
    )
    V = text.vocab_size  # special token ids sit at the top of the vocabulary
    return Qwen2_5_VLConfig(
        text=text,
        vision=vision,
        image_token_id=V - 4,
        video_token_id=V - 3,
        vision_start_token_id=V - 2,
        vision_end_token_id=V - 1,
        bos_token_id=None,
        eos_token_id=None,
    )


def random_params(config: Qwen2_5_VLConfig, dtype: Any, seed: int = 0) -> Any:
    """Random weights made on the device in one program (no float32 copy of a bf16 model)."""
    return jax.jit(lambda key: init_random_params(config, key, dtype))(jax.random.key(seed))


def count_params(tree: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def tree_bytes(tree: Any) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))
