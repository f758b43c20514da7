"""Fixtures for parity against HF transformers: tiny random models, saved and converted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import pytest
from fixtures.hf_models import TEXT_CONFIGS, VISION_CONFIGS, build_hf_model, hf_config


@pytest.fixture(autouse=True)
def _highest_precision() -> Any:
    with jax.default_matmul_precision("highest"):
        yield


class ConvertedModel:
    """An HF model, its saved directory, and the vlm-gym model_dir converted from it."""

    def __init__(self, name: str, root: Path, vision: str = "default") -> None:
        import jax.numpy as jnp
        from vlmgym_convert import hf_to_jax
        from vlmgym_model import load_model

        self.name = name
        self.hf_config = hf_config(TEXT_CONFIGS[name], VISION_CONFIGS[vision])
        self.hf_model = build_hf_model(self.hf_config)
        self.hf_dir = root / f"{name}-hf"
        self.hf_model.save_pretrained(self.hf_dir)
        self.model_dir = root / f"{name}-jax"
        hf_to_jax(self.hf_dir, self.model_dir, progress=False)
        self.config, self.params = load_model(self.model_dir, dtype=jnp.float32)


_CACHE: dict[tuple[str, str], ConvertedModel] = {}


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """converted(name, vision="default") -> ConvertedModel, built once per session.

    `name` picks a text config (TEXT_CONFIGS), `vision` a vision tower (VISION_CONFIGS).
    """

    def get(name: str, vision: str = "default") -> ConvertedModel:
        key = (name, vision)
        if key not in _CACHE:
            root = tmp_path_factory.mktemp(name if vision == "default" else f"{name}-{vision}")
            _CACHE[key] = ConvertedModel(name, root, vision)
        return _CACHE[key]

    return get
