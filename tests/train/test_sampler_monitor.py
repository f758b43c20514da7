"""The rollout/train agreement monitor: every step's first update reports |log pi_sampler -
log pi_trainer| on the sampled tokens (`monitor/sampler_gap_mean`, `_max`). About 0 in fp32
(sampler and trainer run the same code); an injected mismatch shows up; its max is a true
max over micro-batches; a run logs it from the first update of each step."""

from __future__ import annotations

import dataclasses
import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures.sampled_batch import sampled_batch
from vlmgym_model import CompletionStatics
from vlmgym_train.checkpointing import TrainState
from vlmgym_train.config import TrainConfig
from vlmgym_train.grpo import logprob_passes, step_metrics, train_step
from vlmgym_train.losses import LossConfig
from vlmgym_train.microbatch import PolicyView, split_micro
from vlmgym_train.optim import OptimConfig, make_optimizer
from vlmgym_train.trainer import Trainer

GROUPS, GROUP_SIZE, NEW = 3, 4, 6
STATICS = CompletionStatics(logprob_chunk=16)
ON_POLICY_GAP = 1e-4  # the bound for fp32 sampler vs fp32 trainer


@pytest.fixture(scope="module")
def rollout(tiny_model_dir):
    """A batch sampled in fp32 by the tiny model, and those params."""
    config, params, batch = sampled_batch(
        tiny_model_dir, [1, 4, 5], 2, group_size=GROUP_SIZE, new_tokens=NEW
    )
    return config, params, dataclasses.replace(batch, behaviour_logp=batch.old_logp)


def test_monitor_is_zero_on_policy_and_a_true_max_over_micro_batches(rollout):
    config, params, batch = rollout
    tx = make_optimizer(OptimConfig(lr=1e-4))
    step = jax.jit(functools.partial(
        train_step, tx=tx, config=config, statics=STATICS, loss_name="ppo_clip",
        loss_cfg=LossConfig(is_correction="token_tis", is_cap=2.0), view=PolicyView(jnp.float32),
    ))  # fmt: skip
    state = TrainState.create(params, tx)

    def metrics(b):  # 12 rows in micro-batches of 5: 3 micro-batches
        return {k: float(v) for k, v in step(state, split_micro(b, 5))[1].items()}

    m = metrics(batch)
    assert m["monitor/sampler_gap_max"] < ON_POLICY_GAP, m
    assert m["monitor/sampler_gap_mean"] < ON_POLICY_GAP / 10, m
    # one token off by 0.5 in the first micro-batch, one by 0.3 in the second: the max
    # over micro-batches is 0.5 (a sum of per-micro-batch maxima would be 0.8)
    behaviour = np.array(batch.behaviour_logp)
    behaviour[0, 0] -= 0.5
    behaviour[6, 0] -= 0.3
    got = metrics(dataclasses.replace(batch, behaviour_logp=behaviour))
    assert got["monitor/sampler_gap_max"] == pytest.approx(0.5, abs=ON_POLICY_GAP)
    tokens = float(np.asarray(batch.mask).sum())
    assert got["monitor/sampler_gap_mean"] == pytest.approx(0.8 / tokens, abs=ON_POLICY_GAP)
    # the behaviour ratio there is exp(0.5), the largest token weight: a max as well
    assert got["is/weight_max"] == pytest.approx(np.exp(0.5), rel=1e-3)
    assert got["is/weight_mean"] > m["is/weight_mean"]


def test_step_keeps_the_sampler_logprobs_and_logs_the_first_update(rollout):
    """logprob_passes: the recomputed log-probs become old_logp, the sampler's stay as
    behaviour_logp; step_metrics: the monitor from the first update (left out for a stale
    batch), `*_max` metrics as maxima over updates, the others as means."""
    _, _, batch = rollout
    batch = dataclasses.replace(batch, behaviour_logp=None)
    sampled = np.asarray(batch.old_logp)
    cfg = SimpleNamespace(
        optim=SimpleNamespace(micro_batch_size=None), rollout=SimpleNamespace(max_turns=1)
    )
    setup = SimpleNamespace(
        behaviour_logprobs=lambda state, micro: sampled - 0.25, ref_logprobs=None,
        place=lambda micro: micro, cfg=cfg,
    )  # fmt: skip
    stats: dict[str, float] = {}
    out = logprob_passes(setup, None, batch, stats)
    tokens = np.asarray(batch.inputs.segment_ids) > 0
    np.testing.assert_array_equal(out.behaviour_logp, sampled)
    np.testing.assert_allclose(out.old_logp[tokens], sampled[tokens] - 0.25, rtol=1e-6)
    assert stats["logprob/sampler_gap_max"] == pytest.approx(0.25, rel=1e-5)
    first = {"loss": 1.0, "skipped": 0.0, "is/weight_max": 1.5,
             "monitor/sampler_gap_mean": 0.01, "monitor/sampler_gap_max": 0.1}  # fmt: skip
    later = {**first, "loss": 3.0, "is/weight_max": 2.0, "monitor/sampler_gap_max": 0.9}
    rewards = np.arange(GROUPS * GROUP_SIZE, dtype=np.float32).reshape(GROUPS, GROUP_SIZE)
    m = step_metrics([first, later], out, [], rewards, rewards, {})
    assert (m["loss"], m["is/weight_max"]) == (2.0, 2.0)
    assert (m["monitor/sampler_gap_max"], m["monitor/sampler_gap_mean"]) == (0.1, 0.01)
    stale = step_metrics([first, later], out, [], rewards, rewards, {"async/staleness": 1.0})
    assert not any(k.startswith("monitor/") for k in stale)


def test_trainer_logs_the_monitor_every_step(tmp_path):
    """A run with a correction recomputes the proximal log-probs each step, weighs by them
    and logs the monitor. (The shapes of test_original_options' run: compiles are shared.)"""
    cfg = TrainConfig.flat(
        env_name="shapes", save_dir=str(tmp_path), groups_per_batch=2, group_size=4,
        num_generation_tokens=3, total_steps=1, is_correction="token_tis", progress=False,
    )  # fmt: skip
    m = Trainer(cfg).step(0)
    assert m["monitor/sampler_gap_max"] < ON_POLICY_GAP, m
    assert m["logprob/sampler_gap_max"] < ON_POLICY_GAP, m  # the recomputing pass's view
    assert m["is/weight_mean"] == pytest.approx(1.0, abs=ON_POLICY_GAP)
    assert m["is/truncated_frac"] == 0.0
