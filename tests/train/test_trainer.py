"""The trainer end to end: sharded steps, kill and resume, NaN handling, learning."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import vlmgym_envs
from vlmgym_envs import StepResult
from vlmgym_envs.shapes import ShapesEnv
from vlmgym_model import load_model
from vlmgym_model.checkpoint import flatten_params
from vlmgym_train.config import TrainConfig
from vlmgym_train.grpo import collect_groups, score_groups
from vlmgym_train.trainer import Trainer, TrainingError

SMALL = [
    "--groups_per_batch=2", "--group_size=4", "--num_generation_tokens=3",
    "--progress=false", "--seed=1",
]  # fmt: skip
HERE = Path(__file__).parent


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vlmgym_train.cli", *args]


def env_without_xla_flags() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


@pytest.mark.parametrize(("fsdp", "tensor"), [(2, 4)])
def test_sharded_step_equals_unsharded(tmp_path, tol, fsdp, tensor):
    proc = subprocess.run(
        [sys.executable, str(HERE / "sharded_step.py"), str(tmp_path), str(fsdp), str(tensor)],
        capture_output=True, text=True, timeout=900, env=env_without_xla_flags(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    pattern = r"max_param_diff=(\S+) loss_diff=(\S+) sharded=(\d+) opt_sharded=(\d+)"
    found = re.search(pattern, proc.stdout)
    assert found, proc.stdout
    assert float(found.group(1)) <= tol["float32"]
    assert float(found.group(2)) <= tol["float32"]
    assert int(found.group(3)) > 0, "no parameter was sharded"
    # the optimizer's moments live where their params do (2 per sharded param for AdamW)
    assert int(found.group(4)) == 2 * int(found.group(3)), proc.stdout


def metrics_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timing = re.compile(r"^(time/|tokens/s|samples/s|time$)")
    return [{k: v for k, v in r.items() if not timing.match(k)} for r in rows]


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    # two updates per step: checkpoints, intervals and metrics must all count steps
    steps = ["--total_steps=12", "--save_interval=2", "--minibatches=2"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    env = env_without_xla_flags()
    subprocess.run(cli(f"--save_dir={full}", *SMALL, *steps), check=True, env=env, timeout=900)
    proc = subprocess.Popen(
        cli(f"--save_dir={killed}", *SMALL, *steps), env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 900
    while not (killed / "checkpoints" / "4").is_dir():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "final_model").exists(), "the run was not killed mid-training"
    subprocess.run(
        cli(f"--save_dir={killed}", "--resume", *SMALL, *steps), check=True, env=env, timeout=900
    )
    assert sorted(int(p.name) for p in (full / "checkpoints").iterdir()) == [8, 10, 12]
    a = metrics_rows(full)
    b = metrics_rows(killed)
    assert [r["step"] for r in b] == list(range(1, 13))
    assert a == b
    _, pa = load_model(full / "final_model", dtype=np.float32)
    _, pb = load_model(killed / "final_model", dtype=np.float32)
    fa, fb = flatten_params(pa), flatten_params(pb)
    for name in fa:
        np.testing.assert_array_equal(np.asarray(fa[name]), np.asarray(fb[name]), err_msg=name)


class NaNRewards(ShapesEnv):
    def step(self, state, text):
        return StepResult(reward=float("nan"), done=True, info={})


def test_non_finite_losses_skip_updates_then_stop_with_a_checkpoint(tmp_path, caplog):
    vlmgym_envs.register("nan_shapes", NaNRewards, overwrite=True)
    try:
        cfg = TrainConfig.flat(
            env_name="nan_shapes", save_dir=str(tmp_path), groups_per_batch=2, group_size=2,
            num_generation_tokens=2, total_steps=10, max_nan_steps=3, progress=False,
        )  # fmt: skip
        trainer = Trainer(cfg)
        before = jax.device_get(trainer.state.params)
        with caplog.at_level("WARNING"), pytest.raises(TrainingError, match="3 consecutive"):
            trainer.run()
    finally:
        vlmgym_envs.unregister("nan_shapes")
    assert "update skipped" in caplog.text
    assert trainer.checkpointer.latest_step() == 3
    after = jax.device_get(trainer.state.params)
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(x, y)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [1.0, 1.0, 1.0]


def test_periodic_test_logs_the_eval_metrics(tmp_path):
    cfg = TrainConfig.flat(
        save_dir=str(tmp_path), groups_per_batch=2, group_size=2, total_steps=2,
        test_env_name="shapes", test_interval=2, test_tasks=4, progress=False,
    )  # fmt: skip
    Trainer(cfg).run()
    saved = json.loads((tmp_path / "eval" / "step_000002" / "metrics.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "test/accuracy" in r]
    assert len(logged) == 1 and logged[0]["step"] == 2
    assert logged[0]["test/accuracy"] == saved["accuracy"] and saved["tasks"] == 4


@pytest.mark.parametrize("minibatches", [1, 2])
def test_minibatches_keep_rows_aligned_with_their_reference(tmp_path, minibatches):
    """With a negligible learning rate the policy stays the reference and the behaviour
    policy: both KLs must be ~0 in every minibatch of every epoch. Rows paired with another
    row's behaviour or reference log-probs would give KLs of order 0.1."""
    cfg = TrainConfig.flat(
        save_dir=str(tmp_path), groups_per_batch=2, group_size=4, num_generation_tokens=3,
        total_steps=1, ppo_epochs=2, minibatches=minibatches, kl_coef=0.1, lr=1e-12,
        progress=False, seed=2, save_interval=2,
    )  # fmt: skip
    trainer = Trainer(cfg)
    metrics = trainer.step(0)
    assert int(trainer.state.step) == 2 * minibatches
    assert metrics["skipped"] == 0
    assert metrics["kl/ref"] < 1e-6 and metrics["approx_kl"] < 1e-6, metrics
    assert abs(metrics["ratio/mean"] - 1.0) < 1e-4
    # Minibatches of rows from any prompts, and a second step: one compiled update.
    trainer.step(1)
    assert trainer.step_fn._cache_size() == 1
    # --save_interval and the checkpoints' numbers count steps, not optimizer updates.
    trainer.save(1)
    trainer.save(2)
    trainer.checkpointer.wait()
    assert trainer.checkpointer.all_steps() == [2]


def test_overlong_penalty_reads_each_trajectorys_completion_length(tmp_path):
    cfg = TrainConfig.flat(
        save_dir=str(tmp_path), groups_per_batch=2, group_size=4, num_generation_tokens=3,
        overlong="penalty", overlong_buffer=2, progress=False, seed=3, temperature=1.0,
    )  # fmt: skip
    trainer = Trainer(cfg)
    rollouts = collect_groups(trainer.setup, trainer.rollout_params(), 0)
    batch, trajs, rewards, _ = score_groups(trainer.setup, rollouts)
    lengths = batch.lengths()  # one turn: one row per trajectory
    assert [t.info["length"] for t in trajs] == lengths.tolist()
    raw = np.array([t.reward for t in trajs], np.float32)
    penalty = np.clip((lengths - (3 - 2)) / 2, 0.0, 1.0)
    np.testing.assert_allclose(rewards.reshape(-1), raw - penalty, atol=1e-6)
    assert penalty.max() > 0, "no completion was long enough to test the penalty"
