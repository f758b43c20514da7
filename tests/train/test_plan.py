"""`vlmgym-train --plan`: per-device memory from compiled programs, written to plan.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SMALL = ["--groups_per_batch=4", "--group_size=4", "--num_generation_tokens=8",
         "--max_prompt_tokens=64", "--plan_image_size=56", "--progress=false"]  # fmt: skip


def _plan(tmp_path, *flags: str) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    argv = [sys.executable, "-m", "vlmgym_train.cli", "--plan", f"--save_dir={tmp_path}",
            *SMALL, *flags]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "plan.json").read_text()), proc.stdout


def test_plan_of_a_sharded_lora_run_with_micro_batches(tmp_path):
    plan, table = _plan(tmp_path, "--mesh_fsdp=2", "--lora_rank=4", "--micro_batch_size=2")
    parts = plan["parts"]
    assert plan["devices"] == 2 and plan["mesh"]["fsdp"] == 2  # simulated CPU devices
    assert plan["micro_batch_size"] == 2 and plan["lora_rank"] == 4
    assert plan["peak_bytes_per_device"] == max(parts["update_phase"], parts["rollout_phase"])
    assert parts["frozen_base"] > 0 and parts["train_state"] > 0
    assert parts["train_step_temp"] > 0 and parts["sampler_temp"] > 0
    assert "peak per device" in table and "GiB" in table
    assert not list(tmp_path.glob("checkpoints"))  # nothing trained, no weights read


def test_micro_batches_bound_the_update_temps(tmp_path):
    whole, _ = _plan(tmp_path / "whole")
    micro, _ = _plan(tmp_path / "micro", "--micro_batch_size=2")
    assert micro["parts"]["train_step_temp"] < whole["parts"]["train_step_temp"] / 2, (
        micro["parts"],
        whole["parts"],
    )


def test_plan_refuses_a_missing_model(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    argv = [sys.executable, "-m", "vlmgym_train.cli", "--plan", f"--model_dir={tmp_path}/nope"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("vlmgym-train: error:")
    assert "config.json" in proc.stderr
