"""One GRPO-family training step, top to bottom, as plain functions.

    grpo_step(setup, state, step)
      1. collect_groups   tasks of the step -> `group_size` samples each, scored by the env;
                          with dynamic sampling, groups of equal rewards are replaced
      2. score_groups     rows of the chosen trajectories (`build_batch`); rewards shaped by
                          the overlong penalty; advantages per group (then optionally
                          whitened over the batch and clipped); the overlong mask
      3. (log-prob passes) the behaviour log-probs recomputed, with
                          --recompute_behaviour_logprobs or --is_correction (the sampler's
                          kept as `behaviour_logp`); log-probs under the frozen
                          reference policy, when kl_coef > 0
      4. update           `ppo_epochs` x `minibatches` jitted `train_step`s: log-probs under
                          the current params, the registered loss, a NaN-skipping update
      5. step_metrics     what the step logs; the KL controller reads the step's KL

Steps 2-5 alone are `train_on_rollouts`: with --max_staleness > 0 (`async_rollout.py`) the
rollouts of later steps are collected in a background thread while this one trains.

The loss functions are in `losses.py`, the advantage estimators in `advantages.py`;
`Trainer` (trainer.py) builds a `StepSetup` once and runs steps: directories, resume,
logging, evaluation and export are its business, not the step's.

A step is the unit everything counts in (`--total_steps`, `--save_interval`,
`--test_interval`, the metrics' x axis): one rollout of `groups_per_batch` x `group_size`
trajectories and the `TrainConfig.updates_per_step` optimizer updates taken on it.
Everything random derives from (seed, step), so a resumed run takes the same steps.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from vlmgym_envs import Env
from vlmgym_model import CompletionStatics, Qwen2_5_VLConfig, Sampler, SamplingParams

from vlmgym_train import distributed
from vlmgym_train.advantages import (
    clip_advantages,
    discount_turns,
    dynamic_sampling_mask,
    global_normalise,
)
from vlmgym_train.batch import Batch, build_batch, slice_rows
from vlmgym_train.checkpointing import TrainState
from vlmgym_train.config import TrainConfig
from vlmgym_train.kl_control import KLController
from vlmgym_train.losses import LossConfig, get_loss
from vlmgym_train.metrics_log import mean_info
from vlmgym_train.microbatch import (
    MicroBatches,
    PolicyView,
    is_max_metric,
    micro_gradients,
    split_micro,
)
from vlmgym_train.optim import apply_if_finite
from vlmgym_train.rollout import Trajectory, TurnRows, gather_round, merge_rounds, run_groups
from vlmgym_train.shaping import mask_truncated, overlong_penalty


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


@dataclasses.dataclass
class StepSetup:
    """Everything a step reads besides the train state (built once by the `Trainer`).

    update_fn: the jitted `train_step` for this run's model, loss and optimizer (the frozen
      base weights bound with LoRA).
    place: puts host `MicroBatches` on the mesh (rows split over the batch axes).
    rollout_params: the params the sampler reads, from the current state.
    ref_logprobs: float32[R, N] log-probs of placed micro-batches under the reference
      policy, or None without a KL term.
    behaviour_logprobs: float32[R, N] log-probs of placed micro-batches under a state's
      policy (--recompute_behaviour_logprobs, --is_correction), or None: the sampler's are
      used.
    kl: the KL coefficient (fixed or adaptive), or None without a KL term.
    """

    cfg: TrainConfig
    env: Env
    sampler: Sampler
    sampling: SamplingParams
    model_config: Qwen2_5_VLConfig
    data: DataOrder
    advantage_fn: Callable[[jax.Array], jax.Array]
    update_fn: Callable[[TrainState, MicroBatches], tuple[TrainState, dict[str, jax.Array]]]
    place: Callable[[MicroBatches], MicroBatches]
    rollout_params: Callable[[TrainState], Any]
    ref_logprobs: Callable[[MicroBatches], jax.Array] | None = None
    behaviour_logprobs: Callable[[TrainState, MicroBatches], jax.Array] | None = None
    kl: KLController | None = None


@dataclasses.dataclass
class Rollouts:
    """One step's sampled trajectories and which of them it trains on."""

    trajectories: list[Trajectory]
    turns: list[TurnRows]
    select: list[int]  # trajectory indices, `group_size` per chosen group
    stats: dict[str, float]
    # updates between the params that sampled them and the params they train (--max_staleness)
    staleness: int = 0


def grpo_step(setup: StepSetup, state: TrainState, step: int) -> tuple[TrainState, dict]:
    """One training step (rollouts, advantages, updates); the new state and its metrics."""
    t0 = time.perf_counter()
    rollouts = collect_groups(setup, setup.rollout_params(state), step)
    return train_on_rollouts(setup, state, rollouts, step, t0)


def train_on_rollouts(
    setup: StepSetup, state: TrainState, rollouts: Rollouts, step: int, t0: float
) -> tuple[TrainState, dict]:
    """The training part of a step (2-5 above) on rollouts sampled already: `grpo_step`
    after `collect_groups`, and what `async_rollout` runs on a batch sampled ahead.

    t0: `time.perf_counter()` when the step began: `time/rollout_s` runs from it to the
    scored batch, `time/step_s` to the end of the step.
    """
    batch, trajs, rewards, advantages = score_groups(setup, rollouts)
    rollouts.stats["time/rollout_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    batch = logprob_passes(setup, state, batch, rollouts.stats)
    rollouts.stats["time/ref_logprob_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    state, update_metrics = update(setup, state, batch, step)
    rollouts.stats["time/update_s"] = time.perf_counter() - t2
    metrics = step_metrics(update_metrics, batch, trajs, rewards, advantages, rollouts.stats)
    metrics.update(_env_metrics(setup.env, trajs))
    if setup.kl is not None:
        metrics["kl/coef"] = setup.kl.coef  # what this step's updates used
        setup.kl.update(metrics.get("kl/ref", float("nan")))
    metrics["time/step_s"] = elapsed = time.perf_counter() - t0
    metrics["samples/s"] = float(len(trajs)) / elapsed
    return state, metrics


def collect_groups(setup: StepSetup, params: Any, step: int) -> Rollouts:
    """Rollouts for one step, `groups_per_batch` groups of `group_size` trajectories.

    With dynamic sampling (DAPO), groups whose rewards are all equal carry no gradient:
    they are replaced by groups of new tasks, up to `max_refill_rounds` extra rounds; if
    too few informative groups turn up, equal-reward groups fill the batch (they get zero
    advantage). With several processes, each rolls out an equal share of every round.
    """
    cfg = setup.cfg
    groups, n = cfg.rollout.groups_per_batch, cfg.rollout.group_size
    dynamic = cfg.algorithm.dynamic_sampling
    key = jax.random.fold_in(jax.random.key(cfg.seed), step)
    rounds: list[tuple[list[Trajectory], list[TurnRows]]] = []
    stats: dict[str, float] = {}
    informative: list[int] = []
    uninformative: list[int] = []
    n_proc = jax.process_count()
    for attempt in range(cfg.algorithm.max_refill_rounds + 1 if dynamic else 1):
        need = groups - len(informative) if attempt else groups
        need = -(-need // n_proc) * n_proc  # an equal share for every process
        tasks, offset = distributed.share(setup.data.take(need))
        trajs, turns, timings = run_groups(
            setup.env,
            setup.sampler,
            params,
            tasks,
            setup.sampling,
            jax.random.fold_in(key, attempt),
            max_turns=cfg.rollout.max_turns,
            group_offset=offset,
            chunks=cfg.rollout.rollout_chunks,
        )
        timings["rollout/groups_local"] = float(len(tasks))
        for k, v in timings.items():
            stats[k] = stats.get(k, 0.0) + v
        trajs, turns = gather_round(trajs, turns)
        groups_seen = sum(len(r[0]) for r in rounds) // n
        rounds.append((trajs, turns))
        rewards = np.array([t.reward for t in trajs], np.float32).reshape(-1, n)
        for g, keep in enumerate(np.asarray(dynamic_sampling_mask(rewards))):
            (informative if keep else uninformative).append(groups_seen + g)
        if not dynamic or len(informative) >= groups:
            break
    trajectories, turns = merge_rounds(rounds)
    if dynamic:
        chosen = sorted((informative + uninformative)[:groups])
        stats["groups/refill_rounds"] = float(len(rounds) - 1)
        stats["groups/informative"] = float(min(len(informative), groups))
    else:
        chosen = list(range(groups))
    select = [g * n + j for g in chosen for j in range(n)]
    return Rollouts(trajectories, turns, select, stats)


def shape_rewards(rewards: np.ndarray, lengths: np.ndarray, cfg: TrainConfig) -> np.ndarray:
    """The env's rewards plus DAPO's overlong penalty (with `--overlong penalty`).

    lengths: int[G * n], each trajectory's completion tokens over all its turns.
    """
    limit, algorithm = cfg.rollout.num_generation_tokens, cfg.algorithm
    if algorithm.overlong != "penalty":
        return rewards
    assert limit is not None
    return rewards + np.asarray(overlong_penalty(lengths, limit, algorithm.overlong_buffer))


def score_groups(
    setup: StepSetup, rollouts: Rollouts
) -> tuple[Batch, list[Trajectory], np.ndarray, np.ndarray]:
    """The training rows of the chosen trajectories, with their advantages.

    Returns (batch, trajectories, rewards float32[G, n] after shaping, advantages [G, n]).
    """
    cfg, rollout, algorithm = setup.cfg, setup.cfg.rollout, setup.cfg.algorithm
    assert rollout.num_generation_tokens is not None
    batch = build_batch(
        setup.model_config,
        rollouts.turns,
        rollout.num_generation_tokens,
        setup.sampler.pad_token_id,
        rollouts.select,
        prompt_slots=rollout.groups_per_batch,
    )
    trajs = [rollouts.trajectories[i] for i in rollouts.select]
    # A trajectory's rows are its turns: its length is their completion tokens summed.
    lengths = np.bincount(batch.trajectory, weights=batch.lengths(), minlength=len(trajs))
    lengths = lengths.astype(np.int64)
    for t, length in zip(trajs, lengths, strict=True):
        t.info["length"] = int(length)  # logged with the env's info
    rewards = shape_rewards(np.array([t.reward for t in trajs], np.float32), lengths, cfg)
    rewards = rewards.reshape(rollout.groups_per_batch, rollout.group_size)
    advantages = setup.advantage_fn(jnp.asarray(rewards))
    if algorithm.advantage_global_norm:
        advantages = global_normalise(advantages, eps=algorithm.std_eps)
    if algorithm.advantage_clip_range is not None:
        advantages = clip_advantages(advantages, *algorithm.advantage_clip_range)
    advantages = np.asarray(advantages)
    mask = batch.mask
    if algorithm.overlong == "mask":  # DAPO's overlong filtering: truncated rows leave the loss
        mask = np.asarray(mask_truncated(mask, batch.truncated))
    batch = dataclasses.replace(
        batch,
        mask=mask,
        advantages=discount_turns(
            advantages.reshape(-1)[batch.trajectory], batch.trajectory, rollout.turn_discount
        ),
        # --token_normaliser batch: every minibatch divides by the step's tokens / minibatches
        # (TRL's "dapo"); None: each minibatch by its own token count
        num_tokens=np.float32(mask.sum() / algorithm.minibatches)
        if algorithm.token_normaliser == "batch"
        else None,
        kl_coef=None if setup.kl is None or not setup.kl.adaptive else np.float32(setup.kl.coef),
    )
    return batch, trajs, rewards, advantages


def logprob_passes(
    setup: StepSetup, state: TrainState, batch: Batch, stats: dict[str, float]
) -> Batch:
    """The batch with the behaviour log-probs recomputed under `state` (when asked) and
    the reference policy's log-probs (with a KL term), one placement shared by both.

    Recomputing keeps the sampler's log-probs in `batch.behaviour_logp` (the behaviour
    policy of `--is_correction`) and logs how far they were from the trainer's:
    `logprob/sampler_gap_mean` and `_max`, |log pi_sampler - log pi_trainer| over the
    sampled tokens (with stale rollouts, the drift of the params as well)."""
    if setup.behaviour_logprobs is None and setup.ref_logprobs is None:
        return batch
    micro = setup.place(
        split_micro(batch, setup.cfg.optim.micro_batch_size, bucket_rows=_varies(setup))
    )
    if setup.behaviour_logprobs is not None:
        tokens = np.asarray(batch.inputs.segment_ids) > 0
        recomputed = distributed.to_host(setup.behaviour_logprobs(state, micro))
        old = np.where(tokens, recomputed[: batch.num_rows], 0.0)  # less the padding rows
        gap = np.abs(old - np.asarray(batch.old_logp))[tokens]
        stats["logprob/sampler_gap_mean"] = float(gap.mean()) if gap.size else 0.0
        stats["logprob/sampler_gap_max"] = float(gap.max()) if gap.size else 0.0
        sampled = batch.old_logp if batch.behaviour_logp is None else batch.behaviour_logp
        batch = dataclasses.replace(
            batch, old_logp=old.astype(np.float32), behaviour_logp=np.asarray(sampled, np.float32)
        )
    if setup.ref_logprobs is not None:
        ref = setup.ref_logprobs(micro)
        batch = dataclasses.replace(batch, ref_logp=distributed.to_host(ref)[: batch.num_rows])
    return batch


def _varies(setup: StepSetup) -> bool:
    """Whether a step's row count varies (multi-turn): its rows are then bucketed."""
    return setup.cfg.rollout.max_turns > 1


def _env_metrics(env: Env, trajs: list[Trajectory]) -> dict[str, float]:
    """The env's own metrics of the step's episodes (`Env.step_metrics`), under `env/`."""
    own = env.step_metrics([t.info for t in trajs])
    return {f"env/{k}": float(v) for k, v in own.items()}


def train_step(
    state: TrainState,
    micro: MicroBatches,
    frozen: Any = None,
    *,
    tx: optax.GradientTransformation,
    config: Qwen2_5_VLConfig,
    statics: CompletionStatics,
    loss_name: str,
    loss_cfg: LossConfig,
    view: PolicyView,
    rounding: str = "nearest",
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on one (mini)batch, its gradient accumulated over its
    micro-batches (jit this with the keyword arguments bound).

    frozen: the frozen base weights when `view.lora` is set (the state holds the adapters).
    """
    grads, metrics = micro_gradients(
        view,
        state.params,
        frozen,
        micro,
        config=config,
        statics=statics,
        loss_fn=get_loss(loss_name),
        loss_cfg=loss_cfg,
    )
    grad_norm = optax.tree.norm(grads)
    key = jax.random.fold_in(jax.random.key(0x5EED), state.step)  # stochastic rounding
    params, opt_state, ok = apply_if_finite(
        tx, grads, state.opt_state, state.params, metrics["loss"], grad_norm,
        rounding=rounding, key=key,
    )  # fmt: skip
    metrics = dict(metrics)
    metrics["grad_norm"] = grad_norm
    metrics["skipped"] = (~ok).astype(jnp.float32)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def update(
    setup: StepSetup, state: TrainState, batch: Batch, step: int
) -> tuple[TrainState, list[dict[str, float]]]:
    """`ppo_epochs` passes over the batch, each in `minibatches` shuffled minibatches.

    Minibatches are cut on the host and placed on the mesh one at a time. With one
    minibatch the rows keep their order (no shuffle).
    """
    algorithm = setup.cfg.algorithm
    rng = np.random.default_rng([setup.cfg.seed, step])
    metrics = []
    for _ in range(algorithm.ppo_epochs):
        rows = batch.num_rows
        order = rng.permutation(rows) if algorithm.minibatches > 1 else np.arange(rows)
        for rows in np.split(order, algorithm.minibatches):
            micro = split_micro(
                slice_rows(batch, rows),
                setup.cfg.optim.micro_batch_size,
                bucket_rows=_varies(setup),
            )
            state, m = setup.update_fn(state, setup.place(micro))
            metrics.append(m)
    return state, jax.device_get(metrics)


def step_metrics(
    updates: list[dict[str, Any]],
    batch: Batch,
    trajs: list[Trajectory],
    rewards: np.ndarray,
    advantages: np.ndarray,
    stats: dict[str, float],
) -> dict[str, float]:
    """What a step logs: the updates' loss metrics (mean over updates; `*_max` ones the
    max), rewards, advantages, lengths, timings and the env's info (mean over trajectories).

    `monitor/sampler_gap_mean` and `_max` come from the first update alone (first epoch,
    first minibatch), whose params are those that sampled the batch unless it is stale
    (`async/staleness` > 0; then they are left out): |log pi_sampler - log pi_trainer| on
    the sampled tokens, the sampler/trainer mismatch, on every step at no extra cost."""
    metrics: dict[str, float] = {}
    for k in updates[0]:
        values = [float(m[k]) for m in updates]
        if not k.startswith("monitor/"):
            metrics[k] = float(np.max(values) if is_max_metric(k) else np.mean(values))
    if stats.get("async/staleness", 0.0) == 0:
        metrics.update({k: float(v) for k, v in updates[0].items() if k.startswith("monitor/")})
    lengths = np.asarray(batch.inputs.segment_ids).sum(axis=1)  # sampled tokens per row
    flat = rewards.reshape(-1)
    metrics.update(
        {
            "reward/mean": float(flat.mean()),
            "reward/std": float(flat.std()),
            "reward/max": float(flat.max()),
            "reward/min": float(flat.min()),
            "adv/mean": float(advantages.mean()),
            "adv/std": float(advantages.std()),
            "adv/abs_max": float(np.abs(advantages).max()),
            "length/mean": float(lengths.mean()),
            "length/max": float(lengths.max()),
            "truncated/frac": float(np.mean(batch.truncated)),
            "groups/zero_variance": float((~np.asarray(dynamic_sampling_mask(rewards))).mean()),
            "tokens/s": float(lengths.sum()) / max(stats.get("time/sample_s", 0.0), 1e-9),
            "skipped": float(sum(float(m["skipped"]) for m in updates)),
        }
    )
    metrics.update({k: float(v) for k, v in stats.items()})
    metrics.update(mean_info([t.info for t in trajs]))
    return metrics
