"""`TrainConfig`: every setting of a training run, and the flags of `vlmgym-train`.

The original project's flag spellings stay valid (`--model_dir --env_name --groups_per_batch
--group_size --lr --total_steps --wandb_project --save_dir --save_interval
--num_generation_tokens --temperature --top_k --top_p --test_env_name --test_interval`).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Any, Literal

from vlmgym_train.advantages import ADVANTAGES
from vlmgym_train.losses import AGGREGATIONS, LOSSES

# The tiny preset's learning rate. On `shapes` at 2e-3 the reward peaked near 0.45 and then
# fell back (to 0.27 at step 200 on one CPU, 0.47 on another: the run is chaotic enough that
# the CPU's rounding decides); at 1e-3 seeds 0-4 end at 0.87, 0.87, 0.68, 0.80, 0.87.
PRESET_LR = 1e-3


def _f(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Train a vision-language model with GRPO-family RL.

    With no arguments: a tiny random Qwen2.5-VL-shaped model on the built-in `shapes` env.
    """

    # --- what to train, on what
    model_dir: str | None = _f(None, "model directory (vlmgym-convert output); none: tiny preset")
    env_name: str = _f("shapes", "environment (shapes, osv5m, nlvr2, caption, or registered)")
    env_kwargs: str = _f("{}", 'JSON keyword arguments for the env, e.g. \'{"data_dir": "x"}\'')
    seed: int = _f(0, "seed for data order, sampling and the preset's init")
    # --- rollouts
    groups_per_batch: int = _f(8, "tasks per step (GRPO groups)")
    group_size: int = _f(16, "samples per task")
    num_generation_tokens: int | None = _f(
        None,
        "max new tokens per completion (default: 2 for the tiny preset, one word and a "
        "stop; 256 with --model_dir)",
    )
    temperature: float = _f(1.0, "sampling temperature")
    top_k: int = _f(0, "top-k when sampling (0 = off)")
    top_p: float = _f(1.0, "nucleus mass when sampling (1 = off)")
    max_turns: int = _f(1, "turn limit for multi-turn environments")
    rollout_chunks: int = _f(
        1, "generate each turn in this many calls, scoring one while the next decodes"
    )
    vlm_max_pixels: int | None = _f(None, "image pixel budget (default: preprocessor config)")
    # --- objective
    advantage: str = _f("grpo", f"advantage estimator: {sorted(ADVANTAGES)}")
    scale_rewards: Literal["group", "batch", "none"] = _f(
        "group",
        "grpo: divide centred rewards by the group's std, the batch's std, or nothing (TRL's "
        "scale_rewards)",
    )
    std_ddof: int = _f(0, "reward std: 0 population, 1 unbiased (TRL, verl)")
    std_eps: float = _f(1e-6, "added to the reward std before dividing (TRL 1e-4, verl 1e-6)")
    loss: str = _f("ppo_clip", f"policy loss: {sorted(LOSSES)}")
    aggregation: Literal["token_mean", "seq_mean", "seq_sum", "constant", "token_sum_norm"] = _f(
        "token_mean",
        "token losses -> scalar: token_mean (DAPO), seq_mean (GRPO), seq_sum (LUSPO), constant "
        "(Dr.GRPO: / (rows * max tokens)), token_sum_norm (verl: / max tokens)",
    )
    seq_denominator: Literal["nonempty", "all"] = _f(
        "nonempty", "rows seq_mean/seq_sum average over: non-empty ones (verl) or all (TRL)"
    )
    token_normaliser: Literal["minibatch", "batch"] = _f(
        "minibatch",
        "token_mean's denominator: the minibatch's tokens, or the step's tokens / minibatches "
        "(TRL's dapo)",
    )
    clip_low: float = _f(0.2, "PPO clip below 1")
    clip_high: float = _f(0.28, "PPO clip above 1 (DAPO clip-higher; = clip_low for GRPO)")
    dual_clip: float | None = _f(
        None, "cap on the ratio for A < 0 (dual-clip PPO; verl clip_ratio_c, TRL delta)"
    )
    kl_coef: float = _f(0.0, "KL penalty to the frozen initial policy (0 = no reference)")
    kl_estimator: Literal["k1", "k2", "k3"] = _f("k3", "KL estimator")
    kl_ratio: bool = _f(
        False, "multiply the KL by the importance ratio (TRL use_bias_correction_kl)"
    )
    entropy_coef: float = _f(0.0, "entropy bonus")
    entropy_aggregation: Literal["loss", "token_mean"] = _f(
        "loss", "entropy bonus aggregated like the loss (verl) or as a token mean (TRL)"
    )
    dynamic_sampling: bool = _f(False, "drop groups whose rewards are all equal and refill")
    max_refill_rounds: int = _f(2, "extra rollout rounds to refill dropped groups")
    overlong: Literal["none", "mask", "penalty"] = _f(
        "none", "truncated completions: keep, mask from the loss, or soft penalty (DAPO)"
    )
    overlong_buffer: int = _f(4, "tokens before the limit where the overlong penalty starts")
    ppo_epochs: int = _f(1, "passes over each rollout batch")
    minibatches: int = _f(1, "minibatches per pass (rows must divide evenly)")
    # --- optimisation
    optimizer: Literal["adamw", "adafactor"] = _f("adamw", "optimizer")
    lr: float | None = _f(
        None, "peak learning rate (default: 1e-3 for the tiny preset, 1e-6 with --model_dir)"
    )
    warmup_steps: int = _f(5, "linear warmup steps")
    schedule: Literal["constant", "cosine"] = _f("constant", "schedule after warmup")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "global gradient-norm clip")
    total_steps: int = _f(200, "training steps")
    train_vision: bool = _f(True, "train the vision tower (false: frozen)")
    remat: bool = _f(False, "rematerialise each decoder layer in the backward pass")
    param_dtype: Literal["float32", "bfloat16"] = _f("float32", "dtype of the trained params")
    compute_dtype: Literal["float32", "bfloat16"] = _f(
        "float32", "dtype of the forward passes (bfloat16 with float32 params = master weights)"
    )
    logprob_chunk: int = _f(1024, "tokens per chunk of [chunk, V] logits in the loss")
    attention_impl: str = _f("xla", "attention implementation (see vlmgym_kernels)")
    max_nan_steps: int = _f(3, "consecutive non-finite steps before the run stops")
    # --- scale
    mesh_data: int = _f(1, "devices on the data axis")
    mesh_fsdp: int = _f(-1, "devices on the fsdp axis (-1: the rest)")
    mesh_tensor: int = _f(1, "devices on the tensor axis")
    coordinator_address: str | None = _f(None, "multi-host: host:port of process 0")
    num_processes: int | None = _f(None, "multi-host: number of processes")
    process_id: int | None = _f(None, "multi-host: this process's id")
    distributed: bool = _f(
        False, "multi-host: start jax.distributed from the cluster's environment (SLURM, MPI, TPU)"
    )
    # --- bookkeeping
    save_dir: str | None = _f(None, "run directory (default: runs/<env>-<time>)")
    save_interval: int = _f(50, "checkpoint every N steps")
    keep_checkpoints: int = _f(3, "checkpoints kept")
    resume: bool = _f(False, "continue the run in --save_dir from its last checkpoint")
    wandb_project: str | None = _f(None, "Weights & Biases project (offline without a key)")
    wandb_run_name: str | None = _f(None, "Weights & Biases run name")
    test_env_name: str | None = _f(None, "environment for periodic evaluation")
    test_interval: int = _f(0, "evaluate every N steps (0 = never)")
    test_tasks: int = _f(32, "tasks per periodic evaluation")
    progress: bool = _f(True, "show a progress bar")

    def __post_init__(self) -> None:
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"--advantage {self.advantage!r}: choose from {sorted(ADVANTAGES)}")
        if self.loss not in LOSSES:
            raise ValueError(f"--loss {self.loss!r}: choose from {sorted(LOSSES)}")
        for name in (
            "groups_per_batch",
            "group_size",
            "num_generation_tokens",
            "total_steps",
            "ppo_epochs",
            "minibatches",
            "max_turns",
            "rollout_chunks",
            "save_interval",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")
        if (self.groups_per_batch * self.group_size) % self.minibatches:
            raise ValueError(
                f"--minibatches {self.minibatches} must divide groups_per_batch * group_size "
                f"= {self.groups_per_batch * self.group_size}"
            )
        if self.advantage == "rloo" and self.group_size < 2:
            raise ValueError("--advantage rloo needs --group_size >= 2")
        takes = inspect.signature(ADVANTAGES[self.advantage]).parameters
        if self.scale_rewards != "group" and "scale" not in takes:
            raise ValueError(f"--scale_rewards applies to --advantage grpo, not {self.advantage}")
        if self.std_ddof != 0 and "ddof" not in takes:
            raise ValueError(f"--std_ddof: --advantage {self.advantage} divides by no std")
        if self.std_ddof not in (0, 1):
            raise ValueError(f"--std_ddof must be 0 or 1, got {self.std_ddof}")
        if self.std_ddof >= self.group_size and self.scale_rewards == "group" and "ddof" in takes:
            raise ValueError("--std_ddof 1 needs --group_size >= 2")
        if not self.std_eps >= 0:
            raise ValueError(f"--std_eps must be >= 0, got {self.std_eps}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"--aggregation {self.aggregation!r}: choose from {AGGREGATIONS}")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"--dual_clip must be > 1, got {self.dual_clip}")
        for name, choices in (
            ("scale_rewards", ("group", "batch", "none")),
            ("seq_denominator", ("nonempty", "all")),
            ("token_normaliser", ("minibatch", "batch")),
            ("entropy_aggregation", ("loss", "token_mean")),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"--{name} {getattr(self, name)!r}: choose from {choices}")
        try:
            kwargs = json.loads(self.env_kwargs)
        except json.JSONDecodeError as err:
            raise ValueError(f"--env_kwargs is not valid JSON: {err}") from err
        if not isinstance(kwargs, dict):
            raise ValueError("--env_kwargs must be a JSON object")
        if self.resume and not self.save_dir:
            raise ValueError("--resume needs --save_dir (the run to continue)")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.test_interval and not self.test_env_name:
            raise ValueError("--test_interval needs --test_env_name")

    def resolved(self) -> TrainConfig:
        """This config with the defaults that depend on the model filled in."""
        preset = self.model_dir is None
        return dataclasses.replace(
            self,
            lr=self.lr if self.lr is not None else (PRESET_LR if preset else 1e-6),
            num_generation_tokens=self.num_generation_tokens or (2 if preset else 256),
        )

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates in one training step (`ppo_epochs` x `minibatches`).

        `total_steps`, `--save_interval` and the progress bar count training steps (one
        rollout batch each); the optimizer's step count and the learning-rate schedule, and
        so the checkpoints' step numbers, count updates."""
        return self.ppo_epochs * self.minibatches

    @property
    def advantage_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the advantage estimator: the std settings it takes."""
        takes = inspect.signature(ADVANTAGES[self.advantage]).parameters
        given = {"eps": self.std_eps, "ddof": self.std_ddof, "scale": self.scale_rewards}
        return {k: v for k, v in given.items() if k in takes}

    @property
    def env_kwargs_dict(self) -> dict[str, Any]:
        return dict(json.loads(self.env_kwargs))
