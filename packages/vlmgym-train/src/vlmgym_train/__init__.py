"""GRPO-family reinforcement learning for vision-language models.

Layout: `grpo` (one training step, top to bottom: rollouts -> rewards and advantages ->
jitted updates -> metrics), `trainer` (the run around the steps: directories, resume,
logging, evaluation, export), `rollout` (sampling groups and scoring them in the env),
`batch` (the one training-batch pytree and its minibatch slicing), `microbatch`
(an update's gradient accumulated over micro-batches; how trained params, full or LoRA,
become the model's weights), `losses`, `shaping` (DAPO's masks and penalty),
`advantages`, `kl_control` (fixed or adaptive KL coefficient), `optim`, `checkpointing`,
`config` (every setting, in the sections of `sections`: rollout, algorithm, optim, mesh,
run; flat on the command line), `plan` (`--plan`: per-device memory from compiled
programs), `evaluate` (`eval_turns`: multi-turn episodes), `judge` (a second model as a
reward), `errors` (what the programs report as one line), `distributed`,
`async_rollout` (`--max_staleness`, `--rollout_devices`), `offpolicy` (importance
corrections for stale or mismatched samples).

Public API:
- advantages: `get_advantage(name)(rewards[G, n]) -> [G, n]` for "grpo", "dr_grpo", "rloo",
  "reinforce", "reinforce_plus_plus"; `register_advantage`, `ADVANTAGES`,
  `dynamic_sampling_mask(rewards) -> bool[G]`, `global_normalise`, `clip_advantages`
- losses: `get_loss(name)(LossInputs, LossConfig) -> (loss, metrics)` for "ppo_clip",
  "gspo", "reinforce"; `register_loss`, `LOSSES`, `aggregate`, `kl_penalty`
- shaping: `mask_truncated`, `overlong_penalty`
- offpolicy: `importance_weights(old_logp, behaviour_logp, mask, correction, cap)`,
  `sampler_gap`
- advantages: `discount_turns` (credit over the turns of a multi-turn trajectory)
- optim: `OptimConfig`, `make_optimizer(cfg, params, trainable=...)`, `make_schedule`,
  `trainable_by_name`, `cast_for_compute`, `is_finite`, `apply_if_finite`
- checkpointing: `TrainState`, `TrainCheckpointer`, `RestoredCheckpoint`
- metrics_log: `MetricsLogger`, `mean_info`, `plot_rewards`
"""

from vlmgym_train.advantages import (
    ADVANTAGES,
    discount_turns,
    dr_grpo,
    dynamic_sampling_mask,
    get_advantage,
    register_advantage,
    reinforce_plus_plus,
    rloo,
)
from vlmgym_train.checkpointing import RestoredCheckpoint, TrainCheckpointer, TrainState
from vlmgym_train.losses import (
    LOSSES,
    LossConfig,
    LossFn,
    LossInputs,
    aggregate,
    get_loss,
    gspo,
    kl_penalty,
    masked_mean,
    ppo_clip,
    register_loss,
)
from vlmgym_train.metrics_log import MetricsLogger, mean_info, plot_rewards
from vlmgym_train.offpolicy import importance_weights, sampler_gap
from vlmgym_train.optim import (
    OptimConfig,
    apply_if_finite,
    cast_for_compute,
    is_finite,
    make_optimizer,
    make_schedule,
    trainable_by_name,
)
from vlmgym_train.shaping import mask_truncated, overlong_penalty

__all__ = [
    "ADVANTAGES",
    "LOSSES",
    "LossConfig",
    "LossFn",
    "LossInputs",
    "MetricsLogger",
    "OptimConfig",
    "RestoredCheckpoint",
    "TrainCheckpointer",
    "TrainState",
    "aggregate",
    "apply_if_finite",
    "cast_for_compute",
    "discount_turns",
    "dr_grpo",
    "dynamic_sampling_mask",
    "get_advantage",
    "get_loss",
    "gspo",
    "importance_weights",
    "is_finite",
    "kl_penalty",
    "make_optimizer",
    "make_schedule",
    "mask_truncated",
    "masked_mean",
    "mean_info",
    "overlong_penalty",
    "plot_rewards",
    "ppo_clip",
    "register_advantage",
    "register_loss",
    "reinforce_plus_plus",
    "rloo",
    "sampler_gap",
    "trainable_by_name",
]
