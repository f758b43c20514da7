"""A tiny preset model on the shapes env, shared by the trainer and evaluation tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import vlmgym_envs
    from vlmgym_train.presets import write_tiny_preset

    root = tmp_path_factory.mktemp("tiny")
    return write_tiny_preset(root / "model", vlmgym_envs.make("shapes"), seed=0)
