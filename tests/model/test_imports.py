"""Importing the packages does no work: no JAX for the processor, no model for the envs."""

from __future__ import annotations

import subprocess
import sys


def loaded_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(out.split())


def test_processor_does_not_import_jax():
    mods = loaded_after(
        "import vlmgym_model; from vlmgym_model import Processor, preprocess_images"
    )
    assert "jax" not in mods and "torch" not in mods


def test_envs_import_neither_jax_nor_the_model():
    mods = loaded_after("import vlmgym_envs; vlmgym_envs.make('shapes')")
    assert not {"jax", "vlmgym_model", "torch"} & mods


def test_model_api_never_imports_torch():
    mods = loaded_after("from vlmgym_model import forward, Sampler, load_model")
    assert "jax" in mods and "torch" not in mods and "transformers" not in mods
