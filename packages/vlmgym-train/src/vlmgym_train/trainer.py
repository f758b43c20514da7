"""A training run: set up from a `TrainConfig`, then GRPO steps (`vlmgym_train.grpo`).

`Trainer` owns what is not the step itself: the run directory, the model and optimizer
state on the mesh, resuming from checkpoints, the metrics log, periodic evaluation, and
exporting the trained policy as a model_dir. `Trainer.step` is `grpo.grpo_step` on the
current state (with --max_staleness or --rollout_devices, the same step on a batch sampled
ahead: `async_rollout.py`); read grpo.py for what one step does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from vlmgym_envs import Env
from vlmgym_model import (
    Processor,
    Sampler,
    SamplingParams,
    ShardingRules,
    adapter_specs,
    init_adapters,
    load_model,
    merge_adapters,
    model_fingerprint,
    param_shardings,
    param_specs,
    save_adapters,
    save_model,
    with_adapters,
)

from vlmgym_train import distributed
from vlmgym_train.advantages import get_advantage
from vlmgym_train.async_rollout import make_meshes, make_step_runner
from vlmgym_train.checkpointing import TrainCheckpointer, TrainState, complete_checkpoints
from vlmgym_train.config import TrainConfig
from vlmgym_train.errors import make_env
from vlmgym_train.grpo import DataOrder, StepSetup, train_step
from vlmgym_train.jsonable import atomic_write_text
from vlmgym_train.kl_control import KLController
from vlmgym_train.metrics_log import MetricsLogger, plot_rewards
from vlmgym_train.microbatch import MicroBatches, PolicyView, micro_logprobs, place_micro
from vlmgym_train.optim import (
    cast_for_compute,
    make_optimizer,
    make_schedule,
    trainable_by_name,
)
from vlmgym_train.plan import warn_if_over_memory
from vlmgym_train.rollout import UnreadableTasks

log = logging.getLogger("vlmgym_train")


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. repeated non-finite losses); a checkpoint was written."""


def _dtype(name: str) -> Any:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


class Trainer:
    """Sets up a run from a `TrainConfig` and trains it (`run()`)."""

    def __init__(self, cfg: TrainConfig) -> None:
        cfg = cfg.resolved()
        assert cfg.rollout.num_generation_tokens is not None and cfg.optim.lr is not None
        self.cfg = cfg
        self.max_new_tokens: int = cfg.rollout.num_generation_tokens
        distributed.initialize(
            cfg.mesh.coordinator_address,
            cfg.mesh.num_processes,
            cfg.mesh.process_id,
            auto=cfg.mesh.distributed,
        )
        self.is_main = jax.process_index() == 0
        warning = warn_if_over_memory(cfg)  # before any weight is read
        if warning:
            log.warning(warning)
        if cfg.rollout.groups_per_batch % jax.process_count():
            raise ValueError(
                f"--groups_per_batch {cfg.rollout.groups_per_batch} must be a multiple of the "
                f"{jax.process_count()} processes (each rolls out an equal share)"
            )
        # the envs first: a bad name or keyword fails before anything is written
        self.env: Env = make_env(cfg.env_name, cfg.env_kwargs_dict)
        if cfg.run.test_env_name:
            make_env(cfg.run.test_env_name, cfg.env_kwargs_dict)
        self.run_dir = self._run_dir()
        self.model_dir = self._model_dir()
        self.mesh, rollout_devices = make_meshes(cfg)  # the second: --rollout_devices
        self.rules = ShardingRules()
        self.param_dtype = _dtype(cfg.optim.param_dtype)
        self.compute_dtype = _dtype(cfg.optim.compute_dtype)
        self.lora = cfg.optim.lora_config()
        self.view = PolicyView(self.compute_dtype, self.lora)
        # With LoRA the base is frozen and kept in the compute dtype; the adapters train.
        self.config, params = load_model(
            self.model_dir,
            dtype=self.param_dtype if self.lora is None else self.compute_dtype,
            mesh=self.mesh,
            rules=self.rules,
        )
        self.processor = Processor.from_model_dir(self.model_dir)
        self.sampler = Sampler(
            self.config,
            self.processor,
            impl=cfg.optim.attention_impl,
            max_pixels=cfg.rollout.vlm_max_pixels,
            length_buckets=cfg.rollout.length_buckets(),
        )
        self.frozen = None if self.lora is None else params  # LoRA's base weights
        self.lora_base = self._lora_base()
        self._init_state(params)
        # the frozen reference policy: the initial params (with LoRA: the base itself)
        self.ref_params = None
        if cfg.algorithm.kl_coef > 0:
            self.ref_params = params if self.lora is not None else jax.tree.map(jnp.copy, params)
        del params
        # Checkpoints, --save_interval and metrics.jsonl all count training steps.
        self.checkpointer = TrainCheckpointer(
            self.run_dir / "checkpoints",
            max_to_keep=cfg.run.keep_checkpoints,
            save_interval=cfg.run.save_interval,
        )
        self.data = DataOrder(len(self.env), cfg.seed)
        self.kl = None
        if cfg.algorithm.kl_coef > 0:
            self.kl = KLController(cfg.algorithm.kl_coef, cfg.algorithm.kl_target)
        resume_step = self._resume() if cfg.run.resume else None
        self.start_step = resume_step or 0
        self.logger = (
            MetricsLogger(
                self.run_dir,
                wandb_project=cfg.run.wandb_project,
                wandb_run_name=cfg.run.wandb_run_name,
                config=dataclasses.asdict(cfg),
                resume_step=resume_step,
            )
            if self.is_main
            else None
        )
        self.setup = self._step_setup()
        self.runner = make_step_runner(cfg, self.setup, self.rollout_params, rollout_devices)
        self.nan_streak = 0
        self.unreadable = UnreadableTasks(cfg.run.max_skip_fraction)
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ setup helpers

    def _run_dir(self) -> Path:
        """The run directory (process 0's name wins), checked not to hold another run."""
        cfg = self.cfg
        default_dir = f"runs/{cfg.env_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(
            cfg.run.save_dir or distributed.allgather_bytes(default_dir.encode())[0].decode()
        )
        if not cfg.run.resume and complete_checkpoints(run_dir / "checkpoints"):
            raise FileExistsError(
                f"{run_dir} already holds checkpoints; pass --resume to continue it or "
                "choose another --save_dir"
            )
        distributed.sync("vlmgym_train:checked_run_dir")
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir

    def _model_dir(self) -> Path:
        if self.cfg.model_dir:
            return Path(self.cfg.model_dir)
        from vlmgym_train.presets import write_tiny_preset

        target = self.run_dir / "init_model"
        if self.is_main and not (target / "params").is_dir():
            write_tiny_preset(target, self.env, seed=self.cfg.seed, family=self.cfg.preset_family)
        distributed.sync("vlmgym_train:init_model")
        return target

    def _init_state(self, params: Any) -> None:
        """The optimizer and the train state, laid out on the mesh as the rules say."""
        cfg = self.cfg
        trainable = None
        if not cfg.optim.train_vision and self.lora is None:
            trainable = lambda p: trainable_by_name(p, frozen=("vision",))  # noqa: E731
        optim = cfg.optim.optim_config(total_updates=cfg.run.total_steps * cfg.updates_per_step)
        self.tx = make_optimizer(optim, trainable=trainable)
        self.lr_schedule = make_schedule(optim)
        specs = param_specs(self.config)
        if self.lora is not None:
            specs = adapter_specs(specs, self.lora)
            key = jax.random.fold_in(jax.random.key(cfg.seed), 0x10A)
            params = init_adapters(param_specs(self.config), self.lora, key, base=params)
        shardings = param_shardings(specs, self.mesh, self.rules)
        # Every update writes the state back with these shardings: the params stay laid out
        # as the rules say (whole replicas per host), the optimizer's moments like their
        # params, and nothing recompiles on their account.
        self.state_shardings = TrainState.shardings(self.tx, params, shardings, self.mesh)
        self.state = jax.jit(
            lambda p: TrainState.create(p, self.tx),
            in_shardings=(shardings,),
            out_shardings=self.state_shardings,
        )(params)

    def _lora_base(self) -> dict[str, str] | None:
        """What a LoRA run's checkpoints record of their base: its directory and fingerprint."""
        if self.lora is None:
            return None
        return {"model_dir": str(self.model_dir), "fingerprint": model_fingerprint(self.model_dir)}

    def _resume(self) -> int | None:
        """Restore the latest checkpoint (None when the run has none yet: a run killed
        before its first save starts again from step 0)."""
        if self.checkpointer.latest_step() is None:
            log.warning("%s has no complete checkpoint yet; starting at step 0", self.run_dir)
            return None
        meta = self.checkpointer.read_meta()
        saved = (meta.get("extra") or {}).get("lora_base")
        if (saved is None) != (self.lora is None):
            raise ValueError(
                f"the checkpoints in {self.run_dir} were "
                f"{'' if saved else 'not '}trained with LoRA; resume with the run's own "
                "--lora_rank / --lora_targets"
            )
        if saved is not None and saved["fingerprint"] != self.lora_base["fingerprint"]:
            raise ValueError(
                f"the LoRA run in {self.run_dir} was trained on the base {saved['model_dir']} "
                f"(fingerprint {saved['fingerprint']}), not {self.model_dir} (fingerprint "
                f"{self.lora_base['fingerprint']}); resume with the same --model_dir"
            )
        changed = self.cfg.check_resume(meta.get("config") or {}, self.run_dir)
        if changed:
            log.warning("resuming %s with changed settings: %s", self.run_dir, changed)
        restored = self.checkpointer.restore(abstract_state=self.state)
        self.state = restored.state
        self.data.position = int(restored.data_position)
        self.env.load_state_dict((restored.extra or {}).get("env_state") or {})
        kl_coef = (restored.extra or {}).get("kl_coef")
        if self.kl is not None and self.kl.adaptive and kl_coef is not None:
            self.kl.coef = float(kl_coef)  # where the controller had got to
        log.info("resumed %s at step %d", self.run_dir, restored.step)
        return restored.step

    def _step_setup(self) -> StepSetup:
        """What `grpo_step` reads: the env, the sampler, the jitted update and placement."""
        cfg = self.cfg
        # how the log-prob pass runs, in the update and in the reference pass
        self.statics = statics = cfg.optim.completion_statics()
        loss_cfg = cfg.algorithm.loss_config(max_tokens=self.max_new_tokens)
        self.step_fn = step_fn = jax.jit(
            functools.partial(
                train_step,
                tx=self.tx,
                config=self.config,
                statics=statics,
                loss_name=cfg.algorithm.loss,
                loss_cfg=loss_cfg,
                view=self.view,
                rounding=cfg.optim.update_rounding,
            ),
            donate_argnums=(0,),
            out_shardings=(self.state_shardings, NamedSharding(self.mesh, PartitionSpec())),
        )

        def update_fn(state: TrainState, micro: MicroBatches) -> Any:
            return step_fn(state, micro, self.frozen)

        ref_logprobs = None
        if self.ref_params is not None:
            ref_fn = jax.jit(
                functools.partial(
                    micro_logprobs,
                    PolicyView(self.compute_dtype),
                    config=self.config,
                    statics=statics,
                )
            )
            ref_params = self.ref_params

            def ref_logprobs(micro: MicroBatches) -> jax.Array:
                return ref_fn(ref_params, None, micro)

        behaviour_logprobs = None
        if cfg.algorithm.recomputes_logprobs:  # --recompute_behaviour_logprobs, --is_correction
            policy_fn = jax.jit(
                functools.partial(micro_logprobs, self.view, config=self.config, statics=statics)
            )

            def behaviour_logprobs(state: TrainState, micro: MicroBatches) -> jax.Array:
                return policy_fn(state.params, self.frozen, micro)

        return StepSetup(
            cfg=cfg,
            env=self.env,
            sampler=self.sampler,
            sampling=SamplingParams(
                max_new_tokens=self.max_new_tokens,
                temperature=cfg.rollout.temperature,
                top_k=cfg.rollout.top_k,
                top_p=cfg.rollout.top_p,
                num_samples=cfg.rollout.group_size,
            ),
            model_config=self.config,
            data=self.data,
            advantage_fn=functools.partial(
                get_advantage(cfg.algorithm.advantage), **cfg.algorithm.advantage_kwargs
            ),
            update_fn=update_fn,
            place=lambda micro: place_micro(micro, self._place),
            rollout_params=self.rollout_params,
            ref_logprobs=ref_logprobs,
            behaviour_logprobs=behaviour_logprobs,
            kl=self.kl,
        )

    def _place(self, x: Any, batch_dim: int | None = None) -> Any:
        """A host array on the mesh: rows (`batch_dim`) split over ("data", "fsdp") when
        they divide evenly, everything else replicated."""
        axes: list[str | None] = [None] * np.ndim(x)
        if batch_dim is not None:
            axes[batch_dim] = "batch"
        spec = self.rules.partition_spec(axes, np.shape(x), self.mesh)
        return distributed.put(x, self.mesh, spec)

    def rollout_params(self, state: TrainState | None = None) -> Any:
        """The params the sampler reads: the trained pytree itself, or its compute cast.

        With several processes, this host's complete replica of them (no copy), so each
        process samples on its own devices.
        """
        params = (state or self.state).params
        if self.lora is not None:  # the adapters on the frozen base, in the compute dtype
            params = with_adapters(
                self.frozen, cast_for_compute(params, self.compute_dtype), self.lora
            )
        elif self.compute_dtype != self.param_dtype:
            params = cast_for_compute(params, self.compute_dtype)
        return distributed.local_view(params, self.mesh)

    # ------------------------------------------------------------------ one step

    def step(self, step: int) -> dict[str, float]:
        """One training step on the current state (`grpo.grpo_step`, or with --max_staleness
        the same step on a batch sampled ahead by `self.runner`); returns its metrics."""
        self.state, metrics = self.runner.step(self.state, step)
        all_skipped = metrics["skipped"] == self.cfg.updates_per_step
        self.nan_streak = self.nan_streak + 1 if all_skipped else 0
        metrics["lr"] = float(self.lr_schedule(int(self.state.step) - 1))
        self.unreadable.count(metrics, self.env)
        return metrics

    # ------------------------------------------------------------------ the loop

    def run(self) -> list[dict[str, float]]:
        """Train until `total_steps`; returns the metrics of every step taken."""
        cfg = self.cfg
        start = self.start_step
        bar = None
        if cfg.run.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=cfg.run.total_steps, initial=start, desc="train", unit="step", file=sys.stderr
            )
        try:
            for step in range(start, cfg.run.total_steps):
                metrics = self.step(step)
                self.history.append(metrics)
                if self.logger is not None:
                    self.logger.log(step + 1, metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        reward=f"{metrics['reward/mean']:.3f}",
                        step_s=f"{metrics['time/step_s']:.1f}",
                        **self.unreadable.postfix(),
                    )  # fmt: skip
                if self.nan_streak >= cfg.run.max_nan_steps:
                    self.save(step + 1, force=True)
                    raise TrainingError(
                        f"{self.nan_streak} consecutive steps had a non-finite loss or "
                        f"gradient (last loss {metrics.get('loss', float('nan'))}); stopped "
                        f"with a checkpoint at step {step + 1} in {self.run_dir}. Lower --lr "
                        "or check the rewards."
                    )
                if self.nan_streak:
                    log.warning("step %d: non-finite loss or gradient, update skipped", step + 1)
                self.save(step + 1, force=step + 1 == cfg.run.total_steps)
                if cfg.run.test_interval and (step + 1) % cfg.run.test_interval == 0:
                    self.evaluate(step + 1)
        finally:
            if bar is not None:
                bar.close()
            self.runner.close()
            self.checkpointer.wait()
        self.finish()
        return self.history

    def save(self, step: int, force: bool = False) -> None:
        position, env_state = self.runner.resume_point(step)  # before the batch of `step`
        self.checkpointer.save(
            step,
            self.state,
            data_position=position,
            config=dataclasses.asdict(self.cfg),
            extra=self._checkpoint_extra(env_state),
            force=force,
        )

    def _checkpoint_extra(self, env_state: dict[str, Any]) -> dict[str, Any] | None:
        """What a checkpoint records besides the state: LoRA's base, the KL controller,
        the env's state."""
        extra: dict[str, Any] = {}
        if self.lora_base:
            extra["lora_base"] = self.lora_base
        if self.kl is not None and self.kl.adaptive:
            extra["kl_coef"] = self.kl.coef
        if env_state:
            extra["env_state"] = env_state
        return extra or None

    def evaluate(self, step: int) -> dict[str, float]:
        """The periodic test on `--test_env_name` (same code as `vlmgym-eval`)."""
        from vlmgym_train.evaluate import EvalConfig, evaluate

        cfg = self.cfg
        params = self.rollout_params()  # every process takes part in the cast
        if not self.is_main:
            return {}  # process 0 evaluates alone, on its own replica
        result = evaluate(
            params,
            self.sampler,
            make_env(cfg.run.test_env_name or cfg.env_name, cfg.env_kwargs_dict),
            EvalConfig(
                max_eval_tasks=cfg.run.test_tasks,
                num_generation_tokens=self.max_new_tokens,
                temperature=0.0,
                seed=cfg.seed,
                max_turns=cfg.rollout.max_turns,
            ),
            output_dir=self.run_dir / "eval" / f"step_{step:06d}",
        )
        metrics = {f"test/{k}": v for k, v in result.metrics.items()}
        if self.logger is not None:
            self.logger.log(step, metrics)
        return metrics

    def finish(self) -> None:
        """Export the trained policy as a model_dir and plot the reward curve (process 0)."""
        if not self.is_main:
            distributed.sync("vlmgym_train:finish")
            return
        final = self.run_dir / "final_model"
        params = distributed.local_view(self.state.params, self.mesh)
        if self.lora is not None:  # the adapters alone, and the model with them merged
            save_adapters(
                self.run_dir / "final_adapters", params, self.lora, self.model_dir, force=True
            )
            params = merge_adapters(self.frozen, params, self.lora)
        save_model(
            final, self.config, jax.device_get(params), copy_files_from=self.model_dir, force=True
        )
        if self.logger is not None:
            self.logger.close()
        jsonl = self.run_dir / "metrics.jsonl"
        if jsonl.is_file():
            plot_rewards(jsonl, self.run_dir / "reward.png")
        atomic_write_text(
            self.run_dir / "summary.json", json.dumps(self.summary(), indent=2) + "\n"
        )
        distributed.sync("vlmgym_train:finish")

    def summary(self) -> dict[str, Any]:
        """Reward means over the first and last 20 steps of the whole run (resumes included)."""
        jsonl = self.run_dir / "metrics.jsonl"
        if jsonl.is_file():
            rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
            rewards = [r["reward/mean"] for r in rows if "reward/mean" in r]
        else:
            rewards = [h["reward/mean"] for h in self.history]
        k = min(20, len(rewards))
        return {
            "steps": len(rewards),
            "window": k,
            "first_reward_mean": float(np.mean(rewards[:k])) if rewards else None,
            "last_reward_mean": float(np.mean(rewards[-k:])) if rewards else None,
            "final_model": str(self.run_dir / "final_model"),
        }
