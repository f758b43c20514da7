"""Asynchronous rollouts (`vlmgym_train.async_rollout`): --max_staleness 0 is the
synchronous step bit for bit, the staleness schedule, checkpoints' resume points, kill +
resume with K = 1, sampling on a sub-mesh (--rollout_devices, 8 simulated devices), and
the default run still learning with K = 1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec
from vlmgym_model import load_model, make_mesh
from vlmgym_model.checkpoint import flatten_params
from vlmgym_train.async_rollout import AsyncRollouts, SyncRollouts, fit_spec
from vlmgym_train.config import TrainConfig
from vlmgym_train.trainer import Trainer

SMALL = dict(groups_per_batch=2, group_size=4, num_generation_tokens=3, progress=False, seed=1)
SMALL_FLAGS = [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in SMALL.items()]
VOLATILE = ("time/", "async/", "tokens/s", "samples/s")  # and the wall clock, "time"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vlmgym_train.cli", *args]


def env_without_xla_flags() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def stable(metrics: dict[str, float]) -> dict[str, float]:
    """A step's metrics without timings and the async bookkeeping."""
    return {k: v for k, v in metrics.items() if k != "time" and not k.startswith(VOLATILE)}


def async_runner(trainer: Trainer, max_staleness: int, save_interval: int) -> AsyncRollouts:
    return AsyncRollouts(
        trainer.setup,
        max_staleness=max_staleness,
        save_interval=save_interval,
        total_steps=trainer.cfg.run.total_steps,
        rollout_params=trainer.rollout_params,
    )


def test_schedule_restarts_at_checkpoints():
    runner = AsyncRollouts(
        None, max_staleness=2, save_interval=5, total_steps=20, rollout_params=lambda s: s
    )  # type: ignore[arg-type]
    runner._start = 0
    assert [runner.version(t) for t in range(12)] == [0, 0, 0, 1, 2, 5, 5, 5, 6, 7, 10, 10]
    runner._start = 7  # resumed at a forced checkpoint off the interval
    assert [runner.version(t) for t in range(7, 12)] == [7, 7, 7, 10, 10]


def test_fit_spec_replicates_what_the_mesh_does_not_divide():
    mesh = make_mesh(1, -1, 1, devices=jax.devices()[:1])
    assert fit_spec(PartitionSpec("fsdp", None), (6, 4), mesh) == PartitionSpec("fsdp", None)


def test_zero_staleness_is_the_synchronous_step_and_k2_follows_its_schedule(tmp_path):
    trainer = Trainer(TrainConfig.flat(save_dir=str(tmp_path), total_steps=6, **SMALL))
    assert isinstance(trainer.runner, SyncRollouts)  # the default: grpo_step itself
    init = jax.tree.map(jnp.copy, trainer.state)

    def run(steps: int) -> tuple[list[dict[str, float]], list[np.ndarray]]:
        metrics = [trainer.step(s) for s in range(steps)]
        return metrics, jax.tree.leaves(jax.device_get(trainer.state.params))

    def restart(runner: AsyncRollouts) -> None:
        trainer.runner.close()
        trainer.state, trainer.data.position = jax.tree.map(jnp.copy, init), 0
        trainer.runner = runner

    sync_metrics, sync_params = run(3)
    restart(async_runner(trainer, max_staleness=0, save_interval=2))
    zero_metrics, zero_params = run(3)
    assert [stable(m) for m in zero_metrics] == [stable(m) for m in sync_metrics]
    assert [m["async/staleness"] for m in zero_metrics] == [0.0, 0.0, 0.0]
    assert all(m["time/wait_rollout_s"] >= 0 for m in zero_metrics)
    for a, b in zip(sync_params, zero_params, strict=True):
        np.testing.assert_array_equal(a, b)

    restart(async_runner(trainer, max_staleness=2, save_interval=4))
    k2_metrics = [trainer.step(s) for s in range(4)]
    # the batches of steps 4 and 5 (sampled with theta_4) are under way or done; a
    # checkpoint at 4 records where the batch of step 4 began: 4 steps x 2 tasks
    assert trainer.runner.resume_point(4)[0] == 8
    k2_metrics += [trainer.step(s) for s in range(4, 6)]
    trainer.runner.close()
    assert [m["async/staleness"] for m in k2_metrics] == [0.0, 1.0, 2.0, 2.0, 0.0, 1.0]
    assert stable(k2_metrics[0]) == stable(sync_metrics[0])  # theta_0 sampled both
    assert stable(k2_metrics[1]) != stable(sync_metrics[1])  # theta_0 vs theta_1
    assert all(np.isfinite(m["loss"]) for m in k2_metrics)


def metrics_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [stable(r) for r in rows]


def test_kill_and_resume_mid_multi_turn_run_with_staleness_one(tmp_path):
    """Kill + --resume with K=1, in a tool-calling run (shapes_zoom, 2 turns: a zoom, then
    the answer): the same steps, metrics and params as the uninterrupted run."""
    steps = ["--total_steps=4", "--save_interval=2", "--max_staleness=1",
             "--env_name=shapes_zoom", "--max_turns=2"]  # fmt: skip
    full, killed = tmp_path / "full", tmp_path / "killed"
    env = env_without_xla_flags()
    subprocess.run(
        cli(f"--save_dir={full}", *SMALL_FLAGS, *steps), check=True, env=env, timeout=900
    )
    proc = subprocess.Popen(
        cli(f"--save_dir={killed}", *SMALL_FLAGS, *steps), env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 900
    while not (killed / "checkpoints" / "2").is_dir():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final_model").exists(), "the run was not killed mid-training"
    subprocess.run(
        cli(f"--save_dir={killed}", "--resume", *SMALL_FLAGS, *steps),
        check=True, env=env, timeout=900,
    )  # fmt: skip
    a, b = metrics_rows(full), metrics_rows(killed)
    assert [r["step"] for r in b] == list(range(1, 5))
    assert a == b
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["async/staleness"] for r in rows] == [0.0, 1.0] * 2
    assert max(r["env/tool/turns_per_episode"] for r in rows) > 1.0, "no episode zoomed"
    _, pa = load_model(full / "final_model", dtype=np.float32)
    _, pb = load_model(killed / "final_model", dtype=np.float32)
    fa, fb = flatten_params(pa), flatten_params(pb)
    for name in fa:
        np.testing.assert_array_equal(np.asarray(fa[name]), np.asarray(fb[name]), err_msg=name)


ROLLOUT_DEVICES = textwrap.dedent(
    """
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax
    from vlmgym_train.config import TrainConfig
    from vlmgym_train.trainer import Trainer

    cfg = TrainConfig.flat(save_dir=sys.argv[1], total_steps=3, rollout_devices=4,
                           max_staleness=1, groups_per_batch=2, group_size=4,
                           num_generation_tokens=3, progress=False, seed=1)
    trainer = Trainer(cfg)
    copied = []
    copy = trainer.runner.devices.copy
    trainer.runner.devices.copy = lambda p, t: copied.append(copy(p, t)) or copied[-1]
    metrics = [trainer.step(s) for s in range(3)]
    trainer.runner.close()
    train = {d.id for leaf in jax.tree.leaves(trainer.state.params) for d in leaf.devices()}
    sampled = {d.id for leaf in jax.tree.leaves(copied[-1]) for d in leaf.devices()}
    print("train", sorted(train), "sample", sorted(sampled), "copies", len(copied))
    print("staleness", [m["async/staleness"] for m in metrics])
    print("copy_s", [m["time/param_copy_s"] for m in metrics])
    print("finite", all(m["loss"] == m["loss"] for m in metrics))
    """
)


def test_rollout_devices_sample_on_their_own_sub_mesh(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", ROLLOUT_DEVICES, str(tmp_path)],
        capture_output=True, text=True, timeout=900, env=env_without_xla_flags(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "train [0, 1, 2, 3] sample [4, 5, 6, 7] copies 2" in out, out
    assert "staleness [0.0, 1.0, 1.0]" in out, out
    assert "finite True" in out, out
    copy_s = json.loads(out.split("copy_s ")[1].splitlines()[0])
    # step 0 copied twice (before its batch, and after its update for the batch of step 2)
    assert copy_s[0] > 0 and copy_s[1:] == [0.0, 0.0], out
