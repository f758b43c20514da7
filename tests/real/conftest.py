"""Fixtures for tests on real weights: the Qwen2.5-Coder-0.5B checkpoint built by
`fixtures.real_model` (fetched and built once into a cache outside the repository), and the
models that read it. The models are loaded once per module, not per session: 2.5 GB each
in fp32, and the training tests need the memory for AdamW's moments.

A machine that cannot fetch the GGUF fails these tests with the sources it tried.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import pytest
from fixtures.real_model import RealModelDirs, real_model_dirs


@pytest.fixture(autouse=True)
def _highest_precision() -> Any:
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module", autouse=True)
def _release_memory_after_module() -> Any:
    """After each module: its models are garbage now; collect them, drop JAX's compiled
    programs and return freed heap to the system (glibc keeps it otherwise), so the next
    module's models and AdamW moments fit beside what the suite has run before."""
    yield
    import contextlib
    import ctypes
    import gc

    gc.collect()
    jax.clear_caches()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@pytest.fixture(scope="session")
def real_dirs() -> RealModelDirs:
    """(hf_dir, model_dir) of the real-weights checkpoint."""
    return real_model_dirs()


@pytest.fixture(scope="module")
def hf_model(real_dirs: RealModelDirs) -> Any:
    """HF's Qwen2_5_VLForConditionalGeneration on the HF directory, fp32, eager attention."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        real_dirs.hf_dir, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


@pytest.fixture(scope="session")
def hf_processor(real_dirs: RealModelDirs) -> Any:
    """HF's Qwen2.5-VL processor (tokenizer, chat_template.json, the torch-free PIL image
    processor; no video processor, which needs torchvision), padding on the left."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

    class ImagesOnly(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kw):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kw)

    tokenizer = AutoTokenizer.from_pretrained(real_dirs.hf_dir, padding_side="left")
    template = json.loads((real_dirs.hf_dir / "chat_template.json").read_text("utf-8"))
    return ImagesOnly(
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(real_dirs.hf_dir),
        tokenizer=tokenizer,
        chat_template=template["chat_template"],
    )


@pytest.fixture(scope="module")
def jax_model(real_dirs: RealModelDirs) -> Any:
    """(config, params) of the converted model_dir, fp32."""
    import jax.numpy as jnp
    from vlmgym_model import load_model

    return load_model(real_dirs.model_dir, dtype=jnp.float32)
