"""Fixtures for parity against HF transformers: tiny random models, saved and converted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import pytest
from fixtures.hf_models import TEXT_CONFIGS, build_hf_model, hf_config


@pytest.fixture(autouse=True)
def _highest_precision() -> Any:
    with jax.default_matmul_precision("highest"):
        yield


class ConvertedModel:
    """An HF model, its saved directory, and the vlm-gym model_dir converted from it."""

    def __init__(self, name: str, root: Path, vision: dict[str, Any] | None = None) -> None:
        import jax.numpy as jnp
        from vlmgym_convert import hf_to_jax
        from vlmgym_model import load_model

        self.name = name
        self.hf_config = hf_config(TEXT_CONFIGS[name], vision)
        self.hf_model = build_hf_model(self.hf_config)
        self.hf_dir = root / f"{name}-hf"
        self.hf_model.save_pretrained(self.hf_dir)
        self.model_dir = root / f"{name}-jax"
        hf_to_jax(self.hf_dir, self.model_dir, progress=False)
        self.config, self.params = load_model(self.model_dir, dtype=jnp.float32)


_CACHE: dict[str, ConvertedModel] = {}


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """converted(name) -> ConvertedModel, built once per session."""

    def get(name: str) -> ConvertedModel:
        if name not in _CACHE:
            _CACHE[name] = ConvertedModel(name, tmp_path_factory.mktemp(name))
        return _CACHE[name]

    return get
