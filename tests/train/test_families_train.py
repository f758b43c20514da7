"""Training and evaluation on the Qwen3-VL and Qwen2-VL families through the commands.

A tiny model of each family (`write_tiny_model(family=...)`) is exported to HF safetensors
and converted back, as a user's checkpoint would be; `vlmgym-train --model_dir` then runs
two steps on `shapes` (with a KL term, so the reference pass runs too, and two
minibatches) and `vlmgym-eval` evaluates the policy it saved.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from vlmgym_convert import hf_to_jax, jax_to_hf
from vlmgym_envs import make
from vlmgym_model import write_tiny_model
from vlmgym_train.cli import main as train_main
from vlmgym_train.eval_cli import main as eval_main
from vlmgym_train.presets import TINY_PRESET, environment_texts


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_vl"])
def test_train_and_evaluate_a_converted_checkpoint(tmp_path, family):
    env = make("shapes")
    write_tiny_model(tmp_path / "tiny", environment_texts(env), family=family, **TINY_PRESET)
    jax_to_hf(tmp_path / "tiny", tmp_path / "hf", progress=False)
    config = hf_to_jax(tmp_path / "hf", tmp_path / "model", progress=False)
    assert config.model_type == family
    run = tmp_path / "run"
    code = train_main(
        [
            f"--model_dir={tmp_path / 'model'}", f"--save_dir={run}", "--groups_per_batch=2",
            "--group_size=4", "--num_generation_tokens=3", "--total_steps=2", "--lr=1e-3",
            "--kl_coef=0.01", "--minibatches=2", "--progress=false",
        ]
    )  # fmt: skip
    assert code == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    assert all(r["grad_norm"] > 0 for r in rows)
    out = tmp_path / "eval"
    code = eval_main(
        [
            f"--model_dir={run / 'final_model'}", "--max_eval_tasks=4", "--dtype=float32",
            "--num_generation_tokens=3", f"--output_dir={out}",
        ]
    )  # fmt: skip
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tasks"] == 4 and 0.0 <= metrics["accuracy"] <= 1.0
