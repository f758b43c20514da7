"""Resuming: a run killed before its first checkpoint, and flags that change the run."""

from __future__ import annotations

import logging

import pytest
from vlmgym_train.config import TrainConfig
from vlmgym_train.trainer import Trainer


def small(tmp_path, **settings) -> TrainConfig:
    base = dict(
        save_dir=str(tmp_path), groups_per_batch=2, group_size=2, num_generation_tokens=2,
        total_steps=2, progress=False,
    )  # fmt: skip
    return TrainConfig.flat(**{**base, **settings})


def test_a_run_killed_during_its_first_save_starts_again_or_resumes_from_zero(tmp_path, caplog):
    # what a kill during orbax's first write leaves: a temporary folder, no step folder
    (tmp_path / "checkpoints" / "1.orbax-checkpoint-tmp-1764748800").mkdir(parents=True)
    assert Trainer(small(tmp_path)).start_step == 0
    with caplog.at_level(logging.WARNING, logger="vlmgym_train"):
        assert Trainer(small(tmp_path, resume=True)).start_step == 0
    assert "no complete checkpoint yet" in caplog.text


def test_resume_refuses_changed_settings_unless_allowed(tmp_path, caplog):
    trainer = Trainer(small(tmp_path))
    trainer.save(1, force=True)
    trainer.checkpointer.wait()
    with pytest.raises(ValueError, match=r"group_size: 2 -> 4; lr: 0\.001 -> 0\.002") as err:
        Trainer(small(tmp_path, resume=True, group_size=4, lr=2e-3))
    assert "--allow_config_change" in str(err.value) and "\n" not in str(err.value)
    # how and where it runs may change freely
    resumed = Trainer(small(tmp_path, resume=True, save_interval=7, micro_batch_size=2))
    assert resumed.start_step == 1
    with caplog.at_level(logging.WARNING, logger="vlmgym_train"):
        Trainer(small(tmp_path, resume=True, lr=2e-3, allow_config_change=True))
    assert "lr: 0.001 -> 0.002" in caplog.text
