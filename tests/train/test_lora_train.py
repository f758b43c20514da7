"""LoRA runs: bad settings are one-line errors, checkpoints hold the adapters and their
base's fingerprint, and a resume against another base (or without LoRA) is refused."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from vlmgym_model import LoraPair, load_adapters
from vlmgym_model.cli import parse_args
from vlmgym_train.config import TrainConfig
from vlmgym_train.trainer import Trainer


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lora_rank=0"], "--lora_rank must be a positive integer"),
        (["--lora_rank=-4"], "--lora_rank must be a positive integer"),
        (["--lora_rank=8", "--lora_targets=q_proj,qproj"], "unknown LoRA target 'qproj'"),
        (["--lora_rank=8", "--lora_alpha=0"], "alpha must be a positive number"),
        (
            ["--micro_batch_size=3", "--groups_per_batch=2", "--group_size=4"],
            "--micro_batch_size 3 must divide the rows of an update",
        ),
        (["--micro_batch_size=0"], "--micro_batch_size must be >= 1"),
    ],
)
def test_bad_settings_are_one_line_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(TrainConfig, flags, prog="vlmgym-train")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1], err


def test_lora_checkpoints_and_resume_checks(tmp_path, tiny_model_dir):
    flags = dict(
        model_dir=str(tiny_model_dir), save_dir=str(tmp_path / "run"), groups_per_batch=2,
        group_size=4, num_generation_tokens=3, total_steps=1, progress=False,
        lora_rank=4, micro_batch_size=4, lr=1e-3,
    )  # fmt: skip
    trainer = Trainer(TrainConfig.flat(**flags))
    assert all(isinstance(v, LoraPair) for v in trainer.state.params.values())
    trainer.run()
    adapters = load_adapters(tmp_path / "run" / "final_adapters")
    assert adapters.cfg.rank == 4 and adapters.base_model_dir == str(tiny_model_dir.absolute())
    assert any(np.abs(np.asarray(p.b)).max() > 0 for p in adapters.adapters.values())

    # the same run resumes; without LoRA, or on another base, it is refused
    Trainer(TrainConfig.flat(**flags, resume=True))
    with pytest.raises(ValueError, match="were trained with LoRA"):
        Trainer(TrainConfig.flat(**{**flags, "lora_rank": None}, resume=True))
    other = tmp_path / "other_base"
    shutil.copytree(tiny_model_dir, other)
    config = other / "config.json"
    config.write_text(config.read_text() + "\n")  # another copy: same weights, new bytes
    with pytest.raises(ValueError, match="was trained on the base"):
        Trainer(TrainConfig.flat(**{**flags, "model_dir": str(other)}, resume=True))
