"""The default run (`vlmgym-train` with no arguments) visibly learns, within CI's budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from vlmgym_envs.shapes import ShapesEnv


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl", "qwen3_vl+lora"])
def test_default_run_learns(tmp_path, family):
    """The default run (the tiny Qwen3-VL preset), the same run with the tiny Qwen2.5-VL
    preset (--preset_family), and with LoRA (--lora_rank 8: adapters on the decoder's
    attention and MLP, the preset's embeddings trained whole, lr 3e-3, the base frozen)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    argv = [sys.executable, "-m", "vlmgym_train.cli", f"--save_dir={tmp_path}", "--progress=false"]
    if family == "qwen2_5_vl":
        argv.append(f"--preset_family={family}")
    if family.endswith("+lora"):
        argv += ["--lora_rank=8", "--micro_batch_size=32"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    first, last = summary["first_reward_mean"], summary["last_reward_mean"]
    chance = ShapesEnv().chance_reward()["uniform_kind"]  # a random colour word, exact
    print(f"\nmean reward: first 20 steps {first:.3f}, last 20 steps {last:.3f}, chance {chance}")
    assert summary["steps"] == 200
    assert last > first + 0.25, (first, last)
    assert last > chance + 0.05, (last, chance)
    assert (tmp_path / "reward.png").stat().st_size > 0
    assert (tmp_path / "final_model" / "params").is_dir()
    if family.endswith("+lora"):  # the adapters alone, beside the merged model
        assert (tmp_path / "final_adapters" / "lora.json").is_file()


def test_default_run_learns_from_a_dataset(tmp_path):
    """The default run's twin on data: the drawn world exported as a parquet file of (image,
    question, answer) rows, read by `--env_name dataset` with the library's `exact` reward
    (1 for the right word) instead of the env's own scoring."""
    from fixtures.datasets import write_shapes_parquet

    data = write_shapes_parquet(tmp_path / "data" / "shapes.parquet", rows=1024)
    kwargs = {"path": str(data), "image_column": "image", "prompt": "{question}",
              "reward": "exact"}  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "vlmgym_train.cli", f"--save_dir={run}", "--progress=false",
            "--env_name=dataset", f"--env_kwargs={json.dumps(kwargs)}"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    first, last = summary["first_reward_mean"], summary["last_reward_mean"]
    shapes = ShapesEnv()  # chance: a random colour word (exact gives no format credit)
    chance = float(np.mean([1 / len(shapes.config.answers(k)) for k in shapes.config.kinds]))
    print(f"\nmean reward: first 20 steps {first:.3f}, last 20 steps {last:.3f}, chance {chance}")
    assert summary["steps"] == 200
    assert last > first + 0.25, (first, last)
    assert last > chance + 0.05, (last, chance)
