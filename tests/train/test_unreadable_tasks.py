"""Tasks an env cannot show (`SkipTask`): replaced in training, recorded in evaluation,
counted in both, and fatal only past --max_skip_fraction."""

from __future__ import annotations

import json

import jax.numpy as jnp
import pytest
import vlmgym_envs
from vlmgym_envs import SkipCounts, SkipTask
from vlmgym_envs.data.archives import DataError
from vlmgym_envs.shapes import ShapesEnv
from vlmgym_model import Processor, Sampler, load_model
from vlmgym_train.config import TrainConfig
from vlmgym_train.evaluate import EvalConfig, evaluate
from vlmgym_train.rollout import reset_or_replace
from vlmgym_train.trainer import Trainer


class Corrupt(ShapesEnv):
    """`shapes` whose tasks divisible by `every` have a corrupt image."""

    def __init__(self, every: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.every = every
        self.skips = SkipCounts()

    def reset(self, idx):
        if idx % self.every == 0:
            self.skips.add("corrupt_image")
            raise SkipTask("corrupt_image", f"task {idx}: not an image")
        return super().reset(idx)

    def skipped(self):
        return dict(self.skips)


@pytest.fixture
def corrupt_env():
    vlmgym_envs.register("corrupt_shapes", Corrupt, overwrite=True)
    yield "corrupt_shapes"
    vlmgym_envs.unregister("corrupt_shapes")


def test_reset_or_replace_takes_the_next_readable_task():
    env = Corrupt(every=3)
    assert reset_or_replace(env, 4)[0::3] == (4, 0)
    assert reset_or_replace(env, 6)[0::3] == (7, 1)
    with pytest.raises(DataError, match="could not be read"):
        reset_or_replace(Corrupt(every=1), 0)


def test_training_replaces_and_counts_unreadable_tasks(tmp_path, corrupt_env):
    settings = dict(
        env_name=corrupt_env, save_dir=str(tmp_path), groups_per_batch=2, group_size=2,
        num_generation_tokens=2, progress=False, max_skip_fraction=1.0,
    )  # fmt: skip
    trainer = Trainer(TrainConfig.flat(**settings))
    metrics = [trainer.step(s) for s in range(6)]
    skipped = sum(m["data/skipped_tasks"] for m in metrics)
    # the env's own count is cumulative: it includes what the preset's tokenizer scan met
    assert skipped > 0 and metrics[-1]["data/skipped/corrupt_image"] >= skipped
    assert all(m["skipped"] == 0 for m in metrics)  # every step still trained
    # a third of the tasks are unreadable: more than 10% stops the run, once 20 were tried
    strict = Trainer(TrainConfig.flat(**{**settings, "save_dir": str(tmp_path / "strict"),
                                         "max_skip_fraction": 0.1}))  # fmt: skip
    with pytest.raises(DataError, match=r"max_skip_fraction 0\.1"):
        for step in range(20):
            strict.step(step)


def test_evaluation_records_and_counts_unreadable_tasks(tiny_model_dir, tmp_path):
    config, params = load_model(tiny_model_dir, dtype=jnp.float32)
    sampler = Sampler(config, Processor.from_model_dir(tiny_model_dir), length_buckets=(64, 128))
    cfg = EvalConfig(max_eval_tasks=9, num_generation_tokens=2, batch_size=4,
                     max_skip_fraction=1.0)  # fmt: skip
    result = evaluate(params, sampler, Corrupt(every=3), cfg, output_dir=tmp_path)
    unreadable = [r for r in result.records if "skipped" in r]
    assert result.metrics["tasks_skipped"] == len(unreadable) > 0
    assert result.metrics["skipped/corrupt_image"] == len(unreadable)
    assert result.metrics["tasks"] == 9 - len(unreadable)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["tasks_skipped"] == len(unreadable)
    again = evaluate(params, sampler, Corrupt(every=3), cfg, output_dir=tmp_path)  # resumes
    assert again.metrics == {**result.metrics, "eval_seconds": again.metrics["eval_seconds"]}
    with pytest.raises(DataError, match="could not be read"):
        cfg = EvalConfig(max_eval_tasks=24, num_generation_tokens=2, batch_size=8)
        evaluate(params, sampler, Corrupt(every=2), cfg, output_dir=tmp_path / "strict")
