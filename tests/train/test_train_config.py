"""`TrainConfig`: settings in sections, one flat command line, old spellings kept."""

from __future__ import annotations

import dataclasses

import pytest
from vlmgym_model import parse_args
from vlmgym_train.config import PRESET_LR, TrainConfig


def test_flat_names_reach_their_sections():
    cfg = TrainConfig.flat(group_size=4, lr=1e-5, minibatches=2, mesh_fsdp=2, total_steps=9)
    assert (cfg.rollout.group_size, cfg.optim.lr, cfg.algorithm.minibatches) == (4, 1e-5, 2)
    assert (cfg.mesh.fsdp, cfg.run.total_steps, cfg.updates_per_step) == (2, 9, 2)
    assert cfg.replace(group_size=8).rollout == dataclasses.replace(cfg.rollout, group_size=8)
    with pytest.raises(TypeError, match="no setting 'group_sise'"):
        TrainConfig.flat(group_sise=4)


def test_command_line_matches_the_flat_constructor():
    argv = ["--group_size=4", "--lr", "1e-5", "--mesh_fsdp", "2", "--no-progress", "--kl_coef=0.1"]
    want = TrainConfig.flat(group_size=4, lr=1e-5, mesh_fsdp=2, progress=False, kl_coef=0.1)
    assert parse_args(TrainConfig, argv) == want
    old = ["--ckpt_dir", "m", "--max_new_tokens", "7", "--max_pixels", "1024"]
    cfg = parse_args(TrainConfig, old)
    assert (cfg.model_dir, cfg.rollout.num_generation_tokens, cfg.rollout.vlm_max_pixels) == (
        "m",
        7,
        1024,
    )


def test_every_setting_is_a_flag_and_a_flat_name():
    """Each field of each section has one flag, and `flat` accepts exactly those names."""
    cfg = TrainConfig()
    for section in ("rollout", "algorithm", "optim", "mesh", "run"):
        for field in dataclasses.fields(getattr(cfg, section)):
            name = field.metadata.get("flag", field.name)
            value = getattr(getattr(cfg, section), field.name)
            assert TrainConfig.flat(**{name: value}) == cfg, name
            assert field.metadata.get("help"), f"--{name} has no help text"


def test_checks_that_span_sections():
    with pytest.raises(ValueError, match="--minibatches 3 must divide"):
        TrainConfig.flat(minibatches=3)
    with pytest.raises(ValueError, match="rloo with --group_size 1"):
        TrainConfig.flat(advantage="rloo", group_size=1)
    with pytest.raises(ValueError, match="--resume needs --save_dir"):
        TrainConfig.flat(resume=True)
    with pytest.raises(ValueError, match="--group_size must be >= 1"):
        TrainConfig.flat(group_size=0)
    with pytest.raises(ValueError, match="--env_kwargs must be a JSON object"):
        TrainConfig.flat(env_kwargs="[1]")


def test_model_dependent_defaults():
    preset = TrainConfig().resolved()
    assert (preset.optim.lr, preset.rollout.num_generation_tokens) == (PRESET_LR, 2)
    real = TrainConfig.flat(model_dir="m").resolved()
    assert (real.optim.lr, real.rollout.num_generation_tokens) == (1e-6, 256)
    assert TrainConfig.flat(lr=3e-4).resolved().optim.lr == 3e-4
