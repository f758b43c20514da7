"""The GRPO-family training loop: rollouts -> advantages -> clipped policy updates.

One step, as data flows:

    tasks of the step (a seeded permutation of the env, position checkpointed)
    -> Sampler.generate: one prefill per task, `group_size` samples, behaviour log-probs
    -> env.step on each completion's text: rewards and info
    -> advantages per group (dynamic sampling drops groups of equal rewards and refills)
    -> `ppo_epochs` x `minibatches` jitted updates: log-probs recomputed under the current
       params (`vlmgym_model.completion_logprobs`), the registered loss, a NaN-skipping
       optax update
    -> the same params pytree feeds the next rollout (no copy when compute dtype = params').

Everything random derives from (seed, step), so a killed run resumed from its last
checkpoint takes exactly the steps the uninterrupted run would have taken.
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
import optax
from jax.sharding import NamedSharding, PartitionSpec
from vlmgym_envs import Env
from vlmgym_envs import make as make_env
from vlmgym_model import (
    CompletionInputs,
    CompletionStatics,
    Processor,
    Qwen2_5_VLConfig,
    Sampler,
    SamplingParams,
    ShardingRules,
    completion_logprobs,
    compute_logprobs,
    load_model,
    param_shardings,
    param_specs,
    save_model,
)

from vlmgym_train import distributed
from vlmgym_train.advantages import dynamic_sampling_mask, get_advantage
from vlmgym_train.checkpointing import TrainCheckpointer, TrainState
from vlmgym_train.config import TrainConfig
from vlmgym_train.losses import (
    LossConfig,
    LossInputs,
    get_loss,
    mask_truncated,
    overlong_penalty,
)
from vlmgym_train.metrics_log import MetricsLogger, mean_info, plot_rewards
from vlmgym_train.optim import (
    OptimConfig,
    apply_if_finite,
    cast_for_compute,
    make_optimizer,
    make_schedule,
    trainable_by_name,
)
from vlmgym_train.policy import (
    slice_rows,
    to_policy_inputs,
)
from vlmgym_train.rollout import (
    Trajectory,
    TurnRows,
    build_batch,
    gather_round,
    image_layout_arrays,
    merge_rounds,
    run_groups,
)

log = logging.getLogger("vlmgym_train")


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. repeated non-finite losses); a checkpoint was written."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LossArrays:
    old_logp: jax.Array  # float32[R, N]
    mask: jax.Array  # float32[R, N]
    advantages: jax.Array  # float32[R]
    ref_logp: jax.Array | None  # float32[R, N]
    num_tokens: jax.Array | None = None  # float32[]: token_mean's denominator (LossInputs)


def train_step(
    state: TrainState,
    inputs: CompletionInputs,
    arrays: LossArrays,
    *,
    tx: optax.GradientTransformation,
    config: Qwen2_5_VLConfig,
    statics: CompletionStatics,
    loss_name: str,
    loss_cfg: LossConfig,
    compute_dtype: Any,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on one minibatch (jit this with the keyword arguments bound)."""
    loss_fn = get_loss(loss_name)

    def objective(params: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        logp, entropy = completion_logprobs(
            cast_for_compute(params, compute_dtype), config, inputs, statics
        )
        batch = LossInputs(
            logp=logp,
            old_logp=arrays.old_logp,
            mask=arrays.mask,
            advantages=arrays.advantages,
            ref_logp=arrays.ref_logp,
            entropy=entropy,
            num_tokens=arrays.num_tokens,
        )
        return loss_fn(batch, loss_cfg)

    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    params, opt_state, ok = apply_if_finite(
        tx, grads, state.opt_state, state.params, loss, grad_norm
    )
    metrics = dict(metrics)
    metrics["grad_norm"] = grad_norm
    metrics["skipped"] = (~ok).astype(jnp.float32)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


@dataclasses.dataclass
class PreparedBatch:
    """One step's rollouts, ready for the update."""

    batch: Any  # RolloutBatch
    trajectories: list[Trajectory]
    rewards: np.ndarray  # float32[G, n]
    advantages: np.ndarray  # float32[G, n]
    row_advantages: np.ndarray  # float32[R]
    mask: np.ndarray  # float32[R, N], after overlong masking
    stats: dict[str, float]


class DataOrder:
    """A seeded permutation of the env's tasks per epoch; `position` is checkpointed."""

    def __init__(self, size: int, seed: int, position: int = 0) -> None:
        if size < 1:
            raise ValueError("the environment has no tasks")
        self.size, self.seed, self.position = size, seed, position

    def take(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            epoch, offset = divmod(self.position, self.size)
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            out.append(int(perm[offset]))
            self.position += 1
        return out


def _dtype(name: str) -> Any:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


class Trainer:
    """Sets up a run from a `TrainConfig` and trains it (`run()`)."""

    def __init__(self, cfg: TrainConfig) -> None:
        cfg = cfg.resolved()
        assert cfg.num_generation_tokens is not None and cfg.lr is not None
        self.cfg = cfg
        self.max_new_tokens: int = cfg.num_generation_tokens
        distributed.initialize(
            cfg.coordinator_address, cfg.num_processes, cfg.process_id, auto=cfg.distributed
        )
        self.is_main = jax.process_index() == 0
        if cfg.groups_per_batch % jax.process_count():
            raise ValueError(
                f"--groups_per_batch {cfg.groups_per_batch} must be a multiple of the "
                f"{jax.process_count()} processes (each rolls out an equal share)"
            )
        # Every process must agree on the run directory: process 0's name wins.
        default_dir = f"runs/{cfg.env_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.run_dir = Path(
            cfg.save_dir or distributed.allgather_bytes(default_dir.encode())[0].decode()
        )
        ckpt_dir = self.run_dir / "checkpoints"
        if not cfg.resume and ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
            raise FileExistsError(
                f"{self.run_dir} already holds checkpoints; pass --resume to continue it or "
                "choose another --save_dir"
            )
        distributed.sync("vlmgym_train:checked_run_dir")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.env: Env = make_env(cfg.env_name, **cfg.env_kwargs_dict)
        self.model_dir = self._model_dir()
        self.mesh = distributed.process_mesh(cfg.mesh_data, cfg.mesh_fsdp, cfg.mesh_tensor)
        self.rules = ShardingRules()
        self.param_dtype = _dtype(cfg.param_dtype)
        self.compute_dtype = _dtype(cfg.compute_dtype)
        self.config, params = load_model(
            self.model_dir, dtype=self.param_dtype, mesh=self.mesh, rules=self.rules
        )
        self.processor = Processor.from_model_dir(self.model_dir)
        self.sampler = Sampler(
            self.config,
            self.processor,
            impl=cfg.attention_impl,
            max_pixels=cfg.vlm_max_pixels,
        )
        self.sampling = SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            num_samples=cfg.group_size,
        )
        trainable = (
            None if cfg.train_vision else (lambda p: trainable_by_name(p, frozen=("vision",)))
        )
        optim = OptimConfig(
            optimizer=cfg.optimizer,
            lr=cfg.lr,
            warmup_steps=cfg.warmup_steps,
            schedule=cfg.schedule,
            total_steps=cfg.total_steps * cfg.updates_per_step,
            weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm,
        )
        self.tx = make_optimizer(optim, trainable=trainable)
        self.lr_schedule = make_schedule(optim)
        shardings = param_shardings(param_specs(self.config), self.mesh, self.rules)
        self.state = jax.jit(
            lambda p: TrainState.create(p, self.tx, jax.random.key(cfg.seed)),
            in_shardings=(shardings,),
        )(params)
        self.state = self.state.replace(params=jax.device_put(self.state.params, shardings))
        # Every update writes the state back with these shardings: the params stay laid out
        # as the rules say (whole replicas per host), and nothing recompiles on their account.
        self.state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
        self.ref_params = (
            jax.tree.map(jnp.copy, params) if cfg.kl_coef > 0 else None
        )  # frozen reference policy
        del params
        self.loss_cfg = LossConfig(
            clip_low=cfg.clip_low,
            clip_high=cfg.clip_high,
            dual_clip=cfg.dual_clip,
            aggregation=cfg.aggregation,
            seq_denominator=cfg.seq_denominator,
            max_tokens=self.max_new_tokens,
            kl_coef=cfg.kl_coef,
            kl_estimator=cfg.kl_estimator,
            kl_ratio=cfg.kl_ratio,
            entropy_coef=cfg.entropy_coef,
            entropy_aggregation=cfg.entropy_aggregation,
        )
        self.advantage_fn = functools.partial(get_advantage(cfg.advantage), **cfg.advantage_kwargs)
        # Checkpoints are numbered by optimizer updates; --save_interval counts steps.
        self.checkpointer = TrainCheckpointer(
            ckpt_dir,
            max_to_keep=cfg.keep_checkpoints,
            save_interval=cfg.save_interval * cfg.updates_per_step,
        )
        self.data = DataOrder(len(self.env), cfg.seed)
        resume_step = None
        if cfg.resume:
            restored = self.checkpointer.restore(abstract_state=self.state)
            self.state = restored.state
            self.data.position = int(restored.data_position)
            resume_step = restored.step
            log.info("resumed %s at step %d", self.run_dir, restored.step)
        self.logger = (
            MetricsLogger(
                self.run_dir,
                wandb_project=cfg.wandb_project,
                wandb_run_name=cfg.wandb_run_name,
                config=dataclasses.asdict(cfg),
                resume_step=resume_step,
            )
            if self.is_main
            else None
        )
        self._steps: dict[tuple[Any, ...], Any] = {}
        self.nan_streak = 0
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ setup helpers

    def _model_dir(self) -> Path:
        if self.cfg.model_dir:
            return Path(self.cfg.model_dir)
        from vlmgym_train.presets import write_tiny_preset

        target = self.run_dir / "init_model"
        if self.is_main and not (target / "params").is_dir():
            write_tiny_preset(target, self.env, seed=self.cfg.seed)
        distributed.sync("vlmgym_train:init_model")
        return target

    def _step_fn(self, statics: CompletionStatics) -> Any:
        key = (statics,)
        if key not in self._steps:
            self._steps[key] = jax.jit(
                functools.partial(
                    train_step,
                    tx=self.tx,
                    config=self.config,
                    statics=statics,
                    loss_name=self.cfg.loss,
                    loss_cfg=self.loss_cfg,
                    compute_dtype=self.compute_dtype,
                ),
                donate_argnums=(0,),
                out_shardings=(self.state_shardings, NamedSharding(self.mesh, PartitionSpec())),
            )
        return self._steps[key]

    def _place(self, x: Any, batch_dim: int | None = None) -> Any:
        """A host array on the mesh: rows (`batch_dim`) split over ("data", "fsdp") when
        they divide evenly, everything else replicated."""
        if x is None:
            return None
        axes: list[str | None] = [None] * np.ndim(x)
        if batch_dim is not None:
            axes[batch_dim] = "batch"
        spec = self.rules.partition_spec(axes, np.shape(x), self.mesh)
        return distributed.put(x, self.mesh, spec)

    def _place_inputs(self, inputs: CompletionInputs) -> CompletionInputs:
        p = self._place
        return CompletionInputs(
            prompt_ids=p(inputs.prompt_ids, 0),
            prompt_segment_ids=p(inputs.prompt_segment_ids, 0),
            prompt_positions=p(inputs.prompt_positions, 1),
            targets=p(inputs.targets, 0),
            segment_ids=p(inputs.segment_ids, 0),
            positions=p(inputs.positions, 1),
            row_prompt=p(inputs.row_prompt, 0),
            image_rows=p(inputs.image_rows),
            image_cols=p(inputs.image_cols),
            image_feature_index=p(inputs.image_feature_index),
            pixel_values=p(inputs.pixel_values),
            layout=None if inputs.layout is None else {k: p(v) for k, v in inputs.layout.items()},
        )

    def rollout_params(self) -> Any:
        """The params the sampler reads: the trained pytree itself, or its compute cast.

        With several processes, this host's complete replica of them (no copy), so each
        process samples on its own devices.
        """
        params = self.state.params
        if self.compute_dtype != self.param_dtype:
            params = cast_for_compute(params, self.compute_dtype)
        return distributed.local_view(params, self.mesh)

    # ------------------------------------------------------------------ one step

    def collect(
        self, step: int
    ) -> tuple[list[Trajectory], list[TurnRows], list[int], dict[str, float]]:
        """Rollouts for one step: (trajectories, turns, the trajectories to train on, stats).

        With dynamic sampling, groups whose rewards are all equal are replaced by groups of
        new tasks (up to `max_refill_rounds` extra rounds); if too few informative groups
        turn up, equal-reward groups fill the batch (they get zero advantage).
        """
        cfg = self.cfg
        n = cfg.group_size
        key = jax.random.fold_in(jax.random.key(cfg.seed), step)
        params = self.rollout_params()
        rounds = []
        stats: dict[str, float] = {}
        informative: list[int] = []
        uninformative: list[int] = []
        groups_seen = 0
        n_proc = jax.process_count()
        for attempt in range(cfg.max_refill_rounds + 1 if cfg.dynamic_sampling else 1):
            need = cfg.groups_per_batch - len(informative) if attempt else cfg.groups_per_batch
            need = -(-need // n_proc) * n_proc  # an equal share for every process
            tasks, offset = distributed.share(self.data.take(need))
            trajs, turns, timings = run_groups(
                self.env,
                self.sampler,
                params,
                tasks,
                self.sampling,
                jax.random.fold_in(key, attempt),
                max_turns=cfg.max_turns,
                group_offset=offset,
                chunks=cfg.rollout_chunks,
            )
            stats["rollout/groups_local"] = stats.get("rollout/groups_local", 0.0) + len(tasks)
            trajs, turns = gather_round(trajs, turns)
            rounds.append((trajs, turns))
            for k, v in timings.items():
                stats[k] = stats.get(k, 0.0) + v
            rewards = np.array([t.reward for t in trajs], np.float32).reshape(-1, n)
            keep = np.asarray(dynamic_sampling_mask(rewards))
            for g in range(len(keep)):
                (informative if keep[g] else uninformative).append(groups_seen + g)
            groups_seen += len(keep)
            if not cfg.dynamic_sampling or len(informative) >= cfg.groups_per_batch:
                break
        trajectories, turns = merge_rounds(rounds)
        if cfg.dynamic_sampling:
            chosen = (informative + uninformative)[: cfg.groups_per_batch]
            chosen.sort()
            stats["groups/refill_rounds"] = float(len(rounds) - 1)
            stats["groups/informative"] = float(min(len(informative), cfg.groups_per_batch))
        else:
            chosen = list(range(cfg.groups_per_batch))
        select = [g * n + j for g in chosen for j in range(n)]
        return trajectories, turns, select, stats

    def advantages(
        self, trajs: list[Trajectory], lengths: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-trajectory rewards [G, n] (after overlong shaping) and advantages [G, n].

        lengths: int[G * n], each trajectory's completion tokens over all its turns.
        """
        cfg = self.cfg
        rewards = np.array([t.reward for t in trajs], np.float32)
        if cfg.overlong == "penalty":
            rewards = rewards + np.asarray(
                overlong_penalty(lengths, self.max_new_tokens, cfg.overlong_buffer)
            )
        rewards = rewards.reshape(cfg.groups_per_batch, cfg.group_size)
        return rewards, np.asarray(self.advantage_fn(jnp.asarray(rewards)))

    def prepare(self, step: int) -> PreparedBatch:
        """Rollouts, rewards and advantages for one step: everything the update needs."""
        cfg = self.cfg
        t0 = time.perf_counter()
        all_trajs, turns, select, stats = self.collect(step)
        batch = build_batch(
            self.config, turns, self.max_new_tokens, self.sampler.pad_token_id, select
        )
        trajs = [all_trajs[i] for i in select]
        # A trajectory's rows are its turns: its length is their completion tokens summed.
        lengths = np.bincount(
            batch.trajectory, weights=batch.mask.sum(axis=1), minlength=len(trajs)
        ).astype(np.int64)
        for t, length in zip(trajs, lengths, strict=True):
            t.info["length"] = int(length)  # logged with the env's info
        rewards, adv = self.advantages(trajs, lengths)
        mask = batch.mask
        if cfg.overlong == "mask":
            mask = np.asarray(mask_truncated(mask, batch.truncated))
        stats["time/rollout_s"] = time.perf_counter() - t0
        return PreparedBatch(
            batch=batch,
            trajectories=trajs,
            rewards=rewards,
            advantages=adv,
            row_advantages=adv.reshape(-1)[batch.trajectory].astype(np.float32),
            mask=mask,
            stats=stats,
        )

    def update(self, prepared: PreparedBatch, step: int) -> dict[str, float]:
        """`ppo_epochs` x `minibatches` optimizer updates on a prepared batch; its metrics."""
        cfg = self.cfg
        batch = prepared.batch
        t1 = time.perf_counter()
        layout = image_layout_arrays(self.config, batch.image_grid_thw)
        inputs, bounds = to_policy_inputs(
            batch, layout, asarray=np.asarray, prompt_slots=cfg.groups_per_batch
        )
        statics = CompletionStatics(
            prompt_len=batch.prompt_len,
            impl=cfg.attention_impl,
            remat=cfg.remat,
            train_vision=cfg.train_vision,
            logprob_chunk=cfg.logprob_chunk,
            **bounds,
        )
        # The whole batch goes to the devices once; minibatches are cut on the host.
        placed = self._place_inputs(inputs)
        ref_logp = None
        if self.ref_params is not None:
            ref_logp, _ = compute_logprobs(
                cast_for_compute(self.ref_params, self.compute_dtype),
                placed,
                config=self.config,
                statics=statics,
            )
        t_ref = time.perf_counter() - t1

        t2 = time.perf_counter()
        R = batch.input_ids.shape[0]
        step_fn = self._step_fn(statics)
        mb_metrics: list[dict[str, Any]] = []
        rng = np.random.default_rng([cfg.seed, step])
        if cfg.minibatches == 1:
            whole = LossArrays(
                old_logp=self._place(batch.old_logp, 0),
                mask=self._place(prepared.mask, 0),
                advantages=self._place(prepared.row_advantages, 0),
                ref_logp=ref_logp,
                num_tokens=self._place(np.float32(prepared.mask.sum()))
                if cfg.token_normaliser == "batch"
                else None,
            )
            for _ in range(cfg.ppo_epochs):
                self.state, m = step_fn(self.state, placed, whole)
                mb_metrics.append(m)
        else:
            ref_host = None if ref_logp is None else distributed.to_host(ref_logp)
            for _ in range(cfg.ppo_epochs):
                for rows in np.split(rng.permutation(R), cfg.minibatches):
                    arrays = LossArrays(
                        old_logp=self._place(batch.old_logp[rows], 0),
                        mask=self._place(prepared.mask[rows], 0),
                        advantages=self._place(prepared.row_advantages[rows], 0),
                        ref_logp=None if ref_host is None else self._place(ref_host[rows], 0),
                        # --token_normaliser batch: the step's tokens / minibatches (TRL dapo).
                        num_tokens=self._place(np.float32(prepared.mask.sum() / cfg.minibatches))
                        if cfg.token_normaliser == "batch"
                        else None,
                    )
                    sub = self._place_inputs(slice_rows(inputs, rows))
                    self.state, m = step_fn(self.state, sub, arrays)
                    mb_metrics.append(m)
        host = jax.device_get(mb_metrics)
        t_update = time.perf_counter() - t2

        skipped = sum(float(m["skipped"]) for m in host)
        self.nan_streak = self.nan_streak + 1 if skipped == len(host) else 0
        metrics: dict[str, float] = {
            k: float(np.mean([float(m[k]) for m in host])) for k in host[0]
        }
        rewards, adv = prepared.rewards, prepared.advantages
        lengths = batch.mask.sum(axis=1)
        flat_r = rewards.reshape(-1)
        stats = prepared.stats
        metrics.update(
            {
                "reward/mean": float(flat_r.mean()),
                "reward/std": float(flat_r.std()),
                "reward/max": float(flat_r.max()),
                "reward/min": float(flat_r.min()),
                "adv/mean": float(adv.mean()),
                "adv/std": float(adv.std()),
                "adv/abs_max": float(np.abs(adv).max()),
                "length/mean": float(lengths.mean()),
                "length/max": float(lengths.max()),
                "truncated/frac": float(batch.truncated.mean()),
                "groups/zero_variance": float((~np.asarray(dynamic_sampling_mask(rewards))).mean()),
                "time/ref_logprob_s": t_ref,
                "time/update_s": t_update,
                "tokens/s": float(lengths.sum()) / max(stats.get("time/sample_s", 0.0), 1e-9),
                "skipped": skipped,
                "lr": float(self.lr_schedule(int(self.state.step) - 1)),
            }
        )
        metrics.update({k: float(v) for k, v in stats.items()})
        metrics.update(mean_info([t.info for t in prepared.trajectories]))
        return metrics

    def step(self, step: int) -> dict[str, float]:
        """One full training step (rollouts, then updates); returns its metrics."""
        t0 = time.perf_counter()
        metrics = self.update(self.prepare(step), step)
        elapsed = time.perf_counter() - t0
        metrics["time/step_s"] = elapsed
        metrics["samples/s"] = float(self.cfg.groups_per_batch * self.cfg.group_size) / elapsed
        return metrics

    # ------------------------------------------------------------------ the loop

    def run(self) -> list[dict[str, float]]:
        """Train until `total_steps`; returns the metrics of every step taken."""
        cfg = self.cfg
        start = int(self.state.step) // cfg.updates_per_step
        bar = None
        if cfg.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=cfg.total_steps, initial=start, desc="train", unit="step", file=sys.stderr
            )
        try:
            for step in range(start, cfg.total_steps):
                metrics = self.step(step)
                self.history.append(metrics)
                if self.logger is not None:
                    self.logger.log(step + 1, metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        reward=f"{metrics['reward/mean']:.3f}",
                        step_s=f"{metrics['time/step_s']:.1f}",
                    )
                if self.nan_streak >= cfg.max_nan_steps:
                    self.save(step + 1, force=True)
                    raise TrainingError(
                        f"{self.nan_streak} consecutive steps had a non-finite loss or "
                        f"gradient (last loss {metrics.get('loss', float('nan'))}); stopped "
                        f"with a checkpoint at step {step + 1} in {self.run_dir}. Lower --lr "
                        "or check the rewards."
                    )
                if self.nan_streak:
                    log.warning("step %d: non-finite loss or gradient, update skipped", step + 1)
                self.save(step + 1, force=step + 1 == cfg.total_steps)
                if cfg.test_interval and (step + 1) % cfg.test_interval == 0:
                    self.evaluate(step + 1)
        finally:
            if bar is not None:
                bar.close()
            self.checkpointer.wait()
        self.finish()
        return self.history

    def save(self, step: int, force: bool = False) -> None:
        self.checkpointer.save(
            step * self.cfg.updates_per_step,
            self.state,
            data_position=self.data.position,
            config=dataclasses.asdict(self.cfg),
            force=force,
        )

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
            make_env(cfg.test_env_name or cfg.env_name, **cfg.env_kwargs_dict),
            EvalConfig(
                max_eval_tasks=cfg.test_tasks,
                num_generation_tokens=self.max_new_tokens,
                temperature=0.0,
                seed=cfg.seed,
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
        save_model(
            final,
            self.config,
            jax.device_get(distributed.local_view(self.state.params, self.mesh)),
            copy_files_from=self.model_dir,
            force=True,
        )
        if self.logger is not None:
            self.logger.close()
        jsonl = self.run_dir / "metrics.jsonl"
        if jsonl.is_file():
            plot_rewards(jsonl, self.run_dir / "reward.png")
        (self.run_dir / "summary.json").write_text(json.dumps(self.summary(), indent=2) + "\n")
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
