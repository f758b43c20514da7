"""`TrainConfig`: every setting of a training run, in sections, and the flags of `vlmgym-train`.

    cfg = TrainConfig(rollout=RolloutSection(group_size=8), optim=OptimSection(lr=1e-6))
    cfg = TrainConfig.flat(group_size=8, lr=1e-6)          # the same, by setting name
    cfg.rollout.group_size, cfg.optim.lr

Sections: `rollout` (what is sampled), `algorithm` (advantages, loss, reward shaping, how the
batch is split into updates), `optim` (optimizer, schedule, what trains, how the
forward/backward runs), `mesh` (devices and hosts), `run` (length, checkpoints, logging,
evaluation), defined in `vlmgym_train.sections`. Each setting lives in one section, and
every setting's name is unique across them, so the command line stays flat:
`vlmgym-train --group_size 8 --lr 1e-6 --mesh_fsdp 4`.

The original project's flag spellings stay valid (`--model_dir --env_name --groups_per_batch
--group_size --lr --total_steps --wandb_project --save_dir --save_interval
--num_generation_tokens --temperature --top_k --top_p --test_env_name --test_interval`), and
the other commands' names are accepted where they mean the same setting (`--ckpt_dir`,
`--max_new_tokens`, `--max_pixels`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, Literal

from vlmgym_model import flag

from vlmgym_train.jsonable import jsonable
from vlmgym_train.kl_control import KL_TARGET_START
from vlmgym_train.sections import (
    DEFAULT_LORA_TARGETS,
    AlgorithmSection,
    MeshSection,
    OptimSection,
    RolloutSection,
    RunSection,
    _one_of,
)

# The tiny preset's learning rate. On `shapes` with the Qwen2.5-VL preset at 2e-3 the reward
# peaked near 0.45 and then fell back (the run is chaotic enough that the CPU's rounding
# decides); at 1e-3 the last-20-step mean reward of seeds 0-4 is 0.91, 0.96, 0.88, 0.92,
# 0.91 for the Qwen3-VL preset (the default) and 0.87, 0.87, 0.76, 0.69, 0.87 for Qwen2.5-VL.
PRESET_LR = 1e-3
# LoRA's defaults: about 3-10x full fine-tuning's rate, as is usual for adapters
PRESET_LORA_LR = 3e-3
LORA_LR = 1e-5
# The tiny preset's tied embeddings are random at scale 0.02: every logit stays within about
# +-64 * 0.02 = 1.3 unless they train, so LoRA on it trains them whole too (a pretrained
# model's output layer needs no such help).
PRESET_LORA_TARGETS = "attention,mlp,embed"


_SECTIONS = ("rollout", "algorithm", "optim", "mesh", "run")
# estimators whose baseline is the sample's own group: all-zero advantages for groups of one
GROUP_RELATIVE = ("grpo", "dr_grpo", "rloo")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Train a vision-language model with GRPO-family RL.

    With no arguments: a tiny random Qwen3-VL-shaped model on the built-in `shapes` env.
    """

    model_dir: str | None = flag(
        None, "model directory (vlmgym-convert output); none: tiny preset", aliases=("--ckpt_dir",)
    )
    env_name: str = flag("shapes", "environment (shapes, osv5m, nlvr2, caption, or registered)")
    env_kwargs: str = flag("{}", 'JSON keyword arguments for the env, e.g. \'{"data_dir": "x"}\'')
    seed: int = flag(0, "seed for data order, sampling and the preset's init")
    preset_family: Literal["qwen3_vl", "qwen2_5_vl", "qwen2_vl"] = flag(
        "qwen3_vl", "model family of the tiny preset (used without --model_dir)"
    )
    rollout: RolloutSection = dataclasses.field(default_factory=RolloutSection)
    algorithm: AlgorithmSection = dataclasses.field(default_factory=AlgorithmSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    run: RunSection = dataclasses.field(default_factory=RunSection)

    def __post_init__(self) -> None:
        """Checks that span sections (each section checks its own settings)."""
        rollout, algorithm = self.rollout, self.algorithm
        rows = rollout.groups_per_batch * rollout.group_size
        if rows % algorithm.minibatches:
            raise ValueError(
                f"--minibatches {algorithm.minibatches} must divide groups_per_batch * "
                f"group_size = {rows}"
            )
        micro = self.optim.micro_batch_size
        if micro is not None and rollout.max_turns == 1 and (rows // algorithm.minibatches) % micro:
            raise ValueError(
                f"--micro_batch_size {micro} must divide the rows of an update: "
                f"groups_per_batch * group_size / minibatches = {rows // algorithm.minibatches}"
            )
        if rollout.group_size < 2 and algorithm.advantage in GROUP_RELATIVE:
            raise ValueError(
                f"--advantage {algorithm.advantage} with --group_size 1 gives every sample an "
                "advantage of 0 (each is its group's mean) and trains nothing; use "
                "--group_size >= 2, or a batch baseline: --advantage reinforce or "
                "reinforce_plus_plus"
            )
        if rollout.group_size < 2 and algorithm.dynamic_sampling:
            raise ValueError(
                "--dynamic_sampling with --group_size 1 drops every group (one sample never "
                "differs from itself); use --group_size >= 2"
            )
        grouped_std = algorithm.scale_rewards == "group" and "ddof" in algorithm.advantage_kwargs
        if algorithm.std_ddof >= rollout.group_size and grouped_std:
            raise ValueError("--std_ddof 1 needs --group_size >= 2")
        try:
            kwargs = json.loads(self.env_kwargs)
        except json.JSONDecodeError as err:
            raise ValueError(f"--env_kwargs is not valid JSON: {err}") from err
        if not isinstance(kwargs, dict):
            raise ValueError("--env_kwargs must be a JSON object")
        _one_of(self, "preset_family", ("qwen2_5_vl", "qwen3_vl", "qwen2_vl"))

    @classmethod
    def flat(cls, **settings: Any) -> TrainConfig:
        """A config from settings named as on the command line, e.g.
        `TrainConfig.flat(group_size=8, lr=1e-6, mesh_fsdp=4)`."""
        return cls().replace(**settings)

    def replace(self, **settings: Any) -> TrainConfig:
        """This config with some settings changed, named as on the command line."""
        top = {f.name for f in dataclasses.fields(self) if f.name not in _SECTIONS}
        changes: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        own: dict[str, Any] = {}
        names = _setting_names()
        for name, value in settings.items():
            if name in top:
                own[name] = value
            elif name in names:
                section, field = names[name]
                changes[section][field] = value
            else:
                raise TypeError(f"TrainConfig has no setting {name!r}")
        for section, values in changes.items():
            if values:
                own[section] = dataclasses.replace(getattr(self, section), **values)
        return dataclasses.replace(self, **own)

    def resolved(self) -> TrainConfig:
        """This config with the defaults that depend on the model filled in."""
        preset = self.model_dir is None
        lora = self.optim.lora_rank is not None
        default_lr = {
            (True, False): PRESET_LR, (False, False): 1e-6,
            (True, True): PRESET_LORA_LR, (False, True): LORA_LR,
        }[(preset, lora)]  # fmt: skip
        lr = self.optim.lr if self.optim.lr is not None else default_lr
        tokens = self.rollout.num_generation_tokens or (2 if preset else 256)
        targets = self.optim.lora_targets
        if preset and lora and targets == DEFAULT_LORA_TARGETS:
            targets = PRESET_LORA_TARGETS
        kl_coef = self.algorithm.kl_coef
        if self.algorithm.kl_target is not None and kl_coef == 0:
            kl_coef = KL_TARGET_START
        return self.replace(
            lr=lr, num_generation_tokens=tokens, lora_targets=targets, kl_coef=kl_coef
        )

    def changes_from(self, saved: Mapping[str, Any]) -> list[str]:
        """The settings that differ from a saved config (`dataclasses.asdict` of a
        resolved `TrainConfig`, as checkpoints store it) and change what the run computes,
        as "name: saved -> now". Settings that change only how or where it runs (logging,
        checkpoint cadence, the mesh, micro-batches, kernels) are left out."""
        now = _flat_settings(jsonable(dataclasses.asdict(self)))
        before = _flat_settings(jsonable(dict(saved)))
        return [
            f"{name}: {before.get(name, '(unset)')!r} -> {now.get(name, '(unset)')!r}"
            for name in sorted(set(now) | set(before))
            if name not in RESUME_FREE and before.get(name) != now.get(name)
        ]

    def check_resume(self, saved: Mapping[str, Any], run_dir: Any) -> str:
        """Refuse (`ValueError`) to resume the run in `run_dir`, saved with config `saved`,
        with settings that change it, unless --allow_config_change; returns the changes
        allowed ("" when none)."""
        listed = "; ".join(self.changes_from(saved))
        if listed and not self.run.allow_config_change:
            raise ValueError(
                f"--resume with settings that differ from the run in {run_dir}: {listed}. "
                "Resume with the run's own flags, or pass --allow_config_change to apply them"
            )
        return listed

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates in one training step (`ppo_epochs` x `minibatches`).

        `total_steps`, `--save_interval`, the checkpoints' numbers, `metrics.jsonl` and the
        progress bar count training steps (one rollout batch each); only the optimizer's
        step count and the learning-rate schedule count updates."""
        return self.algorithm.updates_per_step

    @property
    def env_kwargs_dict(self) -> dict[str, Any]:
        return dict(json.loads(self.env_kwargs))


# Settings a resumed run may change freely: they do not change what a step computes
# (beyond float rounding), only how it runs, where it logs and how often it saves.
RESUME_FREE = frozenset(
    {
        "resume", "allow_config_change", "progress", "save_interval", "keep_checkpoints",
        "wandb_project", "wandb_run_name", "test_env_name", "test_interval", "test_tasks",
        "max_nan_steps", "plan", "plan_image_size", "mesh_data", "mesh_fsdp", "mesh_tensor",
        "coordinator_address", "num_processes", "process_id", "distributed",
        "micro_batch_size", "attention_impl", "logprob_chunk", "remat", "rollout_chunks",
        "save_dir", "debug", "rollout_devices",
    }
)  # fmt: skip


def _flat_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict (sections nested) as {flag name: value}."""
    out: dict[str, Any] = {}
    names = {(s, f): flag_name for flag_name, (s, f) in _setting_names().items()}
    for key, value in config.items():
        if key in _SECTIONS and isinstance(value, Mapping):
            for field, v in value.items():
                out[names.get((key, field), field)] = v
        else:
            out[key] = value
    return out


def _setting_names() -> dict[str, tuple[str, str]]:
    """Each section setting's flag name -> (section, field)."""
    names: dict[str, tuple[str, str]] = {}
    for section, cls in zip(_SECTIONS, _SECTION_TYPES, strict=True):
        for field in dataclasses.fields(cls):
            names[field.metadata.get("flag", field.name)] = (section, field.name)
    return names


_SECTION_TYPES = (RolloutSection, AlgorithmSection, OptimSection, MeshSection, RunSection)
