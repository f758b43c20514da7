"""The five sections of `TrainConfig` (`vlmgym_train.config`): each setting with its flag,
default and help text, and the checks that need only its own section.

`rollout` (what is sampled), `algorithm` (advantages, loss, reward shaping, how the batch is
split into updates), `optim` (optimizer, schedule, what trains, how the forward/backward
runs), `mesh` (devices and hosts), `run` (length, checkpoints, logging, evaluation).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Literal

from vlmgym_model import CompletionStatics, LoraConfig, default_length_buckets, flag

from vlmgym_train.advantages import ADVANTAGES, parse_clip_range
from vlmgym_train.kl_control import KL_TARGET_START
from vlmgym_train.losses import AGGREGATIONS, LOSSES, LossConfig
from vlmgym_train.offpolicy import IS_CORRECTIONS
from vlmgym_train.optim import OptimConfig

DEFAULT_LORA_TARGETS = "attention,mlp"


def _at_least_one(section: Any, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")


def _finite(section: Any) -> None:
    """Every float setting of `section` is a finite number (no inf or NaN learning rates)."""
    for field in dataclasses.fields(section):
        value = getattr(section, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            name = field.metadata.get("flag", field.name)
            raise ValueError(f"--{name} must be a finite number, got {value}")


def _one_of(section: Any, name: str, choices: tuple[str, ...]) -> None:
    if getattr(section, name) not in choices:
        raise ValueError(f"--{name} {getattr(section, name)!r}: choose from {list(choices)}")


@dataclasses.dataclass(frozen=True)
class RolloutSection:
    """Rollouts: tasks and samples per step, and how completions are sampled."""

    groups_per_batch: int = flag(8, "tasks per step (GRPO groups)")
    group_size: int = flag(16, "samples per task")
    num_generation_tokens: int | None = flag(
        None,
        "max new tokens per completion (default: 2 for the tiny preset, one word and a "
        "stop; 256 with --model_dir)",
        aliases=("--max_new_tokens",),
    )
    temperature: float = flag(1.0, "sampling temperature")
    top_k: int = flag(0, "top-k when sampling (0 = off)")
    top_p: float = flag(1.0, "nucleus mass when sampling (1 = off)")
    max_turns: int = flag(1, "turn limit for multi-turn environments")
    turn_discount: float = flag(
        1.0,
        "multi-turn credit: turn k of T gets turn_discount^(T-1-k) x its trajectory's "
        "advantage (1: every turn the same)",
    )
    max_prompt_tokens: int | None = flag(
        None,
        "the longest prompt allowed, in tokens (a longer one is an error; prompts are never "
        "cut); --plan's prompt length (default there: 512)",
    )
    rollout_chunks: int = flag(
        1, "generate each turn in this many calls, scoring one while the next decodes"
    )
    vlm_max_pixels: int | None = flag(
        None, "image pixel budget (default: preprocessor config)", aliases=("--max_pixels",)
    )
    max_staleness: int = flag(
        0,
        "sample up to K steps ahead in a background thread, with params at most K updates "
        "old, while the current step trains (0: sample, then train)",
    )
    rollout_devices: int = flag(
        0,
        "sample on the last N devices while the others train; params are copied there "
        "after each update (0: sample on the training mesh)",
    )

    def length_buckets(self) -> tuple[int, ...] | None:
        """The sampler's prompt length buckets, ending at --max_prompt_tokens (None: the
        sampler's default)."""
        if self.max_prompt_tokens is None:
            return None
        shorter = tuple(b for b in default_length_buckets() if b < self.max_prompt_tokens)
        return (*shorter, self.max_prompt_tokens)

    def __post_init__(self) -> None:
        _at_least_one(
            self,
            "groups_per_batch",
            "group_size",
            "num_generation_tokens",
            "max_turns",
            "rollout_chunks",
            "vlm_max_pixels",
            "max_prompt_tokens",
        )
        _finite(self)
        if not 0 < self.turn_discount <= 1:
            raise ValueError(f"--turn_discount must be in (0, 1], got {self.turn_discount}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1] (1: off), got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"--top_k must be >= 0 (0: off), got {self.top_k}")
        if self.max_staleness < 0 or self.rollout_devices < 0:
            raise ValueError(
                "--max_staleness and --rollout_devices must be >= 0, got "
                f"{self.max_staleness} and {self.rollout_devices}"
            )


@dataclasses.dataclass(frozen=True)
class AlgorithmSection:
    """Algorithm: advantages, the policy loss and its penalties, reward shaping, group
    filtering, and how a rollout batch becomes optimizer updates."""

    advantage: str = flag("grpo", f"advantage estimator: {sorted(ADVANTAGES)}")
    scale_rewards: Literal["group", "batch", "none"] = flag(
        "group",
        "grpo: divide centred rewards by the group's std, the batch's std, or nothing (TRL's "
        "scale_rewards)",
    )
    std_ddof: int = flag(0, "reward std: 0 population, 1 unbiased (TRL, verl)")
    std_eps: float = flag(1e-6, "added to the reward std before dividing (TRL 1e-4, verl 1e-6)")
    loss: str = flag("ppo_clip", f"policy loss: {sorted(LOSSES)}")
    aggregation: Literal["token_mean", "seq_mean", "seq_sum", "constant", "token_sum_norm"] = flag(
        "token_mean",
        "token losses -> scalar: token_mean (DAPO), seq_mean (GRPO), seq_sum (LUSPO), constant "
        "(Dr.GRPO: / (rows * max tokens)), token_sum_norm (verl: / max tokens)",
    )
    seq_denominator: Literal["nonempty", "all"] = flag(
        "nonempty", "rows seq_mean/seq_sum average over: non-empty ones (verl) or all (TRL)"
    )
    token_normaliser: Literal["minibatch", "batch"] = flag(
        "minibatch",
        "token_mean's denominator: the minibatch's tokens, or the step's tokens / minibatches "
        "(TRL's dapo)",
    )
    clip_low: float = flag(0.2, "PPO clip below 1")
    clip_high: float = flag(0.28, "PPO clip above 1 (DAPO clip-higher; = clip_low for GRPO)")
    dual_clip: float | None = flag(
        None, "cap on the ratio for A < 0 (dual-clip PPO; verl clip_ratio_c, TRL delta)"
    )
    kl_coef: float = flag(
        0.0,
        "KL penalty to the frozen initial policy (0 = no reference); with --kl_target its "
        f"starting value (0: {KL_TARGET_START})",
    )
    kl_target: float | None = flag(
        None,
        "adaptive KL: after each step multiply kl_coef by 1.5 when the step's kl/ref exceeds "
        "2x this, by 1.5^2 above max(0.5, 5x), divide by 1.5 below 0.5x; clamped to "
        "[1e-5, 0.5] (vlmgym_train.kl_control)",
    )
    kl_estimator: Literal["k1", "k2", "k3"] = flag("k3", "KL estimator")
    kl_ratio: bool = flag(
        False, "multiply the KL by the importance ratio (TRL use_bias_correction_kl)"
    )
    entropy_coef: float = flag(0.0, "entropy bonus")
    entropy_aggregation: Literal["loss", "token_mean"] = flag(
        "loss", "entropy bonus aggregated like the loss (verl) or as a token mean (TRL)"
    )
    advantage_global_norm: bool = flag(
        False,
        "after the estimator, whiten advantages over the whole batch: (A - mean) / (std + std_eps)",
        aliases=("--do_global_normalization",),
    )
    advantage_clip: str | None = flag(
        None,
        "clip advantages (after --advantage_global_norm): 'C' to [-C, C], 'LOW,HIGH' to "
        "[LOW, HIGH]; the original's do_clip_advantages is '0,inf'",
    )
    recompute_behaviour_logprobs: bool = flag(
        False,
        "recompute the behaviour log-probs with the trainer's forward pass before the "
        "updates (one more pass per step). Off: the sampler's own log-probs are the "
        "behaviour policy; they are exact here (same model code; float32 within ~1e-5 of the "
        "trainer's), and they are what sampled the tokens, so the ratio corrects any "
        "sampler/trainer mismatch instead of hiding it",
    )
    is_correction: Literal["none", "token_tis", "seq_tis", "token_mask"] = flag(
        "none",
        "importance weight on each token's policy-gradient term for samples drawn by older "
        "(--max_staleness) or mismatched params: token_tis min(rho, C), seq_tis min(prod_t "
        "rho, C) per row, token_mask 0 outside [1/C, C]; rho = pi_proximal / pi_sampler, the "
        "proximal log-probs recomputed each step (vlmgym_train.offpolicy). With --loss "
        "ppo_clip, token_tis is decoupled PPO (TRL vllm_importance_sampling_mode "
        "token_truncate, sequence_truncate, token_mask)",
    )
    is_cap: float = flag(
        2.0,
        "C > 1 of --is_correction (TRL vllm_importance_sampling_clip_max)",
        aliases=("--vllm_importance_sampling_clip_max",),
    )
    dynamic_sampling: bool = flag(
        False,
        "drop groups whose rewards are all equal and refill",
        aliases=("--do_group_filter",),
    )
    max_refill_rounds: int = flag(2, "extra rollout rounds to refill dropped groups")
    overlong: Literal["none", "mask", "penalty"] = flag(
        "none", "truncated completions: keep, mask from the loss, or soft penalty (DAPO)"
    )
    overlong_buffer: int = flag(4, "tokens before the limit where the overlong penalty starts")
    ppo_epochs: int = flag(1, "passes over each rollout batch")
    minibatches: int = flag(1, "minibatches per pass (rows must divide evenly)")

    def __post_init__(self) -> None:
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"--advantage {self.advantage!r}: choose from {sorted(ADVANTAGES)}")
        if self.loss not in LOSSES:
            raise ValueError(f"--loss {self.loss!r}: choose from {sorted(LOSSES)}")
        _at_least_one(self, "ppo_epochs", "minibatches")
        _finite(self)
        takes = inspect.signature(ADVANTAGES[self.advantage]).parameters
        if self.scale_rewards != "group" and "scale" not in takes:
            raise ValueError(f"--scale_rewards applies to --advantage grpo, not {self.advantage}")
        if self.std_ddof != 0 and "ddof" not in takes:
            raise ValueError(f"--std_ddof: --advantage {self.advantage} divides by no std")
        if self.std_ddof not in (0, 1):
            raise ValueError(f"--std_ddof must be 0 or 1, got {self.std_ddof}")
        if not self.std_eps >= 0:
            raise ValueError(f"--std_eps must be >= 0, got {self.std_eps}")
        if self.kl_target is not None and not 0 < self.kl_target < math.inf:
            raise ValueError(f"--kl_target must be a positive number, got {self.kl_target}")
        if not 0 <= self.kl_coef < math.inf:
            raise ValueError(f"--kl_coef must be a finite number >= 0, got {self.kl_coef}")
        if self.advantage_clip is not None:
            parse_clip_range(self.advantage_clip)
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"--dual_clip must be > 1, got {self.dual_clip}")
        _one_of(self, "aggregation", AGGREGATIONS)
        _one_of(self, "scale_rewards", ("group", "batch", "none"))
        _one_of(self, "seq_denominator", ("nonempty", "all"))
        _one_of(self, "token_normaliser", ("minibatch", "batch"))
        _one_of(self, "entropy_aggregation", ("loss", "token_mean"))
        _one_of(self, "is_correction", IS_CORRECTIONS)
        if not self.is_cap > 1:
            raise ValueError(f"--is_cap must be > 1, got {self.is_cap}")

    @property
    def recomputes_logprobs(self) -> bool:
        """Whether each step recomputes the behaviour log-probs with the trainer's pass
        (--recompute_behaviour_logprobs, or any --is_correction: the proximal policy's)."""
        return self.recompute_behaviour_logprobs or self.is_correction != "none"

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates in one training step (`ppo_epochs` x `minibatches`)."""
        return self.ppo_epochs * self.minibatches

    @property
    def advantage_clip_range(self) -> tuple[float, float] | None:
        """`--advantage_clip` as (low, high), or None."""
        return None if self.advantage_clip is None else parse_clip_range(self.advantage_clip)

    @property
    def advantage_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the advantage estimator: the std settings it takes."""
        takes = inspect.signature(ADVANTAGES[self.advantage]).parameters
        given = {"eps": self.std_eps, "ddof": self.std_ddof, "scale": self.scale_rewards}
        return {k: v for k, v in given.items() if k in takes}

    def loss_config(self, max_tokens: int) -> LossConfig:
        """The loss's hyperparameters; `max_tokens` is the generation budget."""
        return LossConfig(
            clip_low=self.clip_low,
            clip_high=self.clip_high,
            dual_clip=self.dual_clip,
            aggregation=self.aggregation,
            seq_denominator=self.seq_denominator,
            max_tokens=max_tokens,
            kl_coef=self.kl_coef,
            kl_estimator=self.kl_estimator,
            kl_ratio=self.kl_ratio,
            entropy_coef=self.entropy_coef,
            entropy_aggregation=self.entropy_aggregation,
            is_correction=self.is_correction,
            is_cap=self.is_cap,
        )


@dataclasses.dataclass(frozen=True)
class OptimSection:
    """Optimisation: optimizer and schedule, what trains, and how the forward and backward
    passes run (dtypes, remat, log-prob chunks, attention kernel)."""

    optimizer: Literal["adamw", "adafactor"] = flag("adamw", "optimizer")
    lr: float | None = flag(
        None,
        "peak learning rate (default: 1e-3 for the tiny preset, 1e-6 with --model_dir; with "
        "LoRA 3e-3 and 1e-5)",
    )
    warmup_steps: int = flag(5, "linear warmup steps")
    schedule: Literal["constant", "cosine"] = flag("constant", "schedule after warmup")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    max_grad_norm: float = flag(1.0, "global gradient-norm clip")
    train_vision: bool = flag(True, "train the vision tower (false: frozen)")
    remat: bool = flag(False, "rematerialise each decoder layer in the backward pass")
    param_dtype: Literal["float32", "bfloat16"] = flag("float32", "dtype of the trained params")
    compute_dtype: Literal["float32", "bfloat16"] = flag(
        "float32", "dtype of the forward passes (bfloat16 with float32 params = master weights)"
    )
    logprob_chunk: int = flag(1024, "tokens per chunk of [chunk, V] logits in the loss")
    attention_impl: str = flag("xla", "attention implementation (see vlmgym_kernels)")
    micro_batch_size: int | None = flag(
        None,
        "rows per forward/backward pass; gradients accumulate over the micro-batches of an "
        "update, so peak memory follows this, not the batch (default: the whole minibatch)",
    )
    lora_rank: int | None = flag(None, "LoRA rank: train adapters on a frozen base (default: off)")
    lora_alpha: float | None = flag(None, "LoRA alpha; scale = alpha / rank (default: 2 x rank)")
    lora_targets: str = flag(
        DEFAULT_LORA_TARGETS,
        "comma-separated LoRA targets: q_proj k_proj v_proj o_proj gate_proj up_proj "
        "down_proj, vision.qkv_proj vision.o_proj vision.gate_proj vision.up_proj "
        "vision.down_proj, the groups attention, mlp, vision, all (every projection), and "
        "embed, lm_head (trained whole, PEFT's modules_to_save); the tiny preset adds embed",
    )
    update_rounding: Literal["nearest", "stochastic"] = flag(
        "nearest",
        "how bfloat16 params take an update: nearest (updates below half a bf16 ulp are "
        "lost) or stochastic (unbiased rounding: small updates land on average)",
    )
    mu_dtype: Literal["float32", "bfloat16"] | None = flag(
        None, "dtype of AdamW's first moment (default: the params' dtype)"
    )

    def __post_init__(self) -> None:
        _finite(self)
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.max_grad_norm <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError(
                "--max_grad_norm must be > 0, --weight_decay and --warmup_steps >= 0; got "
                f"{self.max_grad_norm}, {self.weight_decay}, {self.warmup_steps}"
            )
        _at_least_one(self, "logprob_chunk")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"--micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.lora_rank is not None:
            self.lora_config()  # checks rank, alpha and targets
        _one_of(self, "update_rounding", ("nearest", "stochastic"))

    def lora_config(self) -> LoraConfig | None:
        """The LoRA settings, or None for full fine-tuning."""
        if self.lora_rank is None:
            return None
        if self.lora_rank <= 0:
            raise ValueError(f"--lora_rank must be a positive integer, got {self.lora_rank}")
        alpha = 2.0 * self.lora_rank if self.lora_alpha is None else self.lora_alpha
        targets = tuple(t for t in self.lora_targets.split(",") if t.strip())
        try:
            return LoraConfig(rank=self.lora_rank, alpha=alpha, targets=targets)
        except ValueError as err:
            raise ValueError(f"--lora_*: {err}") from None

    def completion_statics(self) -> CompletionStatics:
        """How the log-prob pass runs (in the update and the reference pass)."""
        return CompletionStatics(
            impl=self.attention_impl,
            remat=self.remat,
            train_vision=self.train_vision,
            logprob_chunk=self.logprob_chunk,
        )

    def optim_config(self, total_updates: int) -> OptimConfig:
        """The optimizer's settings; the schedule counts `total_updates` updates."""
        assert self.lr is not None, "resolve the config first (TrainConfig.resolved)"
        return OptimConfig(
            optimizer=self.optimizer,
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            schedule=self.schedule,
            total_steps=total_updates,
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm,
            mu_dtype=self.mu_dtype,
            update_rounding=self.update_rounding,
        )


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Devices: the mesh's axes, and the processes of a multi-host run."""

    data: int = flag(1, "devices on the data axis", name="mesh_data")
    fsdp: int = flag(-1, "devices on the fsdp axis (-1: the rest)", name="mesh_fsdp")
    tensor: int = flag(1, "devices on the tensor axis", name="mesh_tensor")
    coordinator_address: str | None = flag(None, "multi-host: host:port of process 0")
    num_processes: int | None = flag(None, "multi-host: number of processes")
    process_id: int | None = flag(None, "multi-host: this process's id")
    distributed: bool = flag(
        False, "multi-host: start jax.distributed from the cluster's environment (SLURM, MPI, TPU)"
    )


@dataclasses.dataclass(frozen=True)
class RunSection:
    """The run: its length, directory, checkpoints, logging and periodic evaluation."""

    total_steps: int = flag(200, "training steps")
    save_dir: str | None = flag(None, "run directory (default: runs/<env>-<time>)")
    save_interval: int = flag(50, "checkpoint every N steps")
    keep_checkpoints: int = flag(3, "checkpoints kept")
    resume: bool = flag(False, "continue the run in --save_dir from its last checkpoint")
    wandb_project: str | None = flag(None, "Weights & Biases project (offline without a key)")
    wandb_run_name: str | None = flag(None, "Weights & Biases run name", aliases=("--wandb_name",))
    test_env_name: str | None = flag(None, "environment for periodic evaluation")
    test_interval: int = flag(0, "evaluate every N steps (0 = never)")
    test_tasks: int = flag(32, "tasks per periodic evaluation")
    progress: bool = flag(True, "show a progress bar")

    max_nan_steps: int = flag(3, "consecutive non-finite steps before the run stops")
    max_skip_fraction: float = flag(
        0.1,
        "stop when more than this fraction of the tasks tried could not be read (corrupt "
        "or oversized images...); each is skipped, replaced and counted until then",
    )
    debug: bool = flag(False, "show the traceback of an error (bad flags, files, full disk)")
    allow_config_change: bool = flag(
        False,
        "--resume even when settings that change the run differ from the saved ones (e.g. "
        "a new --lr or --total_steps); without it such a resume is refused with the list",
    )
    plan: bool = flag(
        False,
        "compile the training step and the sampler on abstract shapes (no weights read), "
        "print per-device peak memory, write plan.json into --save_dir (or .) and exit",
    )
    plan_image_size: int = flag(448, "--plan: the side in pixels of each prompt's square image")

    def __post_init__(self) -> None:
        _at_least_one(
            self, "total_steps", "save_interval", "keep_checkpoints", "max_nan_steps",
            "plan_image_size",
        )  # fmt: skip
        _finite(self)
        if not 0 <= self.max_skip_fraction <= 1:
            raise ValueError(f"--max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")
        if self.resume and not self.save_dir:
            raise ValueError("--resume needs --save_dir (the run to continue)")
        if self.test_interval and not self.test_env_name:
            raise ValueError("--test_interval needs --test_env_name")
