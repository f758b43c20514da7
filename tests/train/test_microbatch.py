"""Micro-batches (`vlmgym_train.microbatch`): an update accumulated over micro-batches is the
full-batch update; the reference pass likewise; LoRA's step 0 is the base model."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures.sampled_batch import sampled_batch
from vlmgym_model import (
    CompletionStatics,
    compute_logprobs,
    param_specs,
)
from vlmgym_model.lora import LoraConfig, LoraPair, init_adapters
from vlmgym_train.checkpointing import TrainState
from vlmgym_train.grpo import train_step
from vlmgym_train.losses import LossConfig
from vlmgym_train.microbatch import PolicyView, micro_logprobs, split_micro
from vlmgym_train.optim import OptimConfig, make_optimizer

GROUPS, GROUP_SIZE, NEW = 3, 4, 6
STATICS = CompletionStatics(logprob_chunk=16)
PARAM_TOL = 1e-5  # the bound on params after one update, fp32
# Adam's first update is lr * g / (|g| + eps): for gradients of size ~eps it magnifies
# summation-order differences of g by up to lr / eps, so the lr stays moderate here.
LR = 1e-4


@pytest.fixture(scope="module")
def rollout(tiny_model_dir):
    config, params, batch = sampled_batch(
        tiny_model_dir, [0, 3, 7], 1, group_size=GROUP_SIZE, new_tokens=NEW
    )
    jitter = np.random.default_rng(1).random((batch.num_rows, NEW)).astype(np.float32)
    batch = dataclasses.replace(batch, ref_logp=np.asarray(batch.old_logp) - 0.05 * jitter)
    return config, params, batch


def _step(config, loss_name, loss_cfg, view, tx):
    return jax.jit(
        functools.partial(
            train_step, tx=tx, config=config, statics=STATICS, loss_name=loss_name,
            loss_cfg=loss_cfg, view=view,
        )
    )  # fmt: skip


CASES = {
    "ppo_token_mean": ("ppo_clip", LossConfig(aggregation="token_mean")),
    "gspo_seq_mean_kl": ("gspo", LossConfig(aggregation="seq_mean", clip_low=3e-4,
                                            clip_high=4e-4, kl_coef=0.1)),
    "ppo_constant_entropy": ("ppo_clip", LossConfig(aggregation="constant", max_tokens=NEW,
                                                    entropy_coef=0.01, kl_coef=0.05)),
}  # fmt: skip


@pytest.mark.parametrize(
    "case",
    ["gspo_seq_mean_kl", "ppo_constant_entropy"],  # token_mean: the LoRA test below
)
def test_micro_batches_equal_the_full_batch(rollout, case):
    config, params, batch = rollout
    loss_name, loss_cfg = CASES[case]
    tx = make_optimizer(OptimConfig(lr=LR))
    step = _step(config, loss_name, loss_cfg, PolicyView(jnp.float32), tx)
    state = TrainState.create(params, tx)
    full, full_metrics = step(state, split_micro(batch, None))
    # 5 rows: prompts straddle micro-batches, and 12 rows pad to 15 (masked copies); with
    # bucket_rows to 20 (a power of two of micro-batches: 4)
    micro = split_micro(batch, 5)
    assert micro.count == 3 and micro.rows == GROUPS * GROUP_SIZE
    assert split_micro(batch, 5, bucket_rows=True).count == 4
    parts, part_metrics = step(state, micro)
    for k in full_metrics:
        np.testing.assert_allclose(float(part_metrics[k]), float(full_metrics[k]),
                                   rtol=1e-5, atol=1e-6, err_msg=k)  # fmt: skip
    assert float(full_metrics["grad_norm"]) > 0 and float(full_metrics["skipped"]) == 0
    diffs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), full.params, parts.params)
    assert max(jax.tree.leaves(diffs)) <= PARAM_TOL, diffs
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), full.params, params)
    assert max(jax.tree.leaves(moved)) > LR / 2  # the update did something


def test_reference_pass_in_micro_batches(rollout, tol):
    config, params, batch = rollout
    logp, _ = compute_logprobs(params, batch.inputs, config=config, statics=STATICS)
    ref = jax.jit(functools.partial(micro_logprobs, PolicyView(jnp.float32), config=config,
                                    statics=STATICS))  # fmt: skip
    got = np.asarray(ref(params, None, split_micro(batch, 5)))[: batch.num_rows]  # less padding
    m = np.asarray(batch.mask) > 0
    np.testing.assert_allclose(np.asarray(got)[m], np.asarray(logp)[m], atol=tol["float32"])


def test_lora_micro_batches_and_step_zero(rollout, tol):
    config, params, batch = rollout
    lora = LoraConfig(rank=4, alpha=8, targets=("all",))
    adapters = init_adapters(param_specs(config), lora, jax.random.key(3))
    view = PolicyView(jnp.float32, lora)
    # step 0 is the base model: the adapted policy's log-probs are the sampler's
    logp = jax.jit(functools.partial(micro_logprobs, view, config=config, statics=STATICS))(
        adapters, params, split_micro(batch, None)
    )[: batch.num_rows]
    m = np.asarray(batch.mask) > 0
    np.testing.assert_allclose(np.asarray(logp)[m], np.asarray(batch.old_logp)[m],
                               atol=tol["float32"])  # fmt: skip
    loss_name, loss_cfg = CASES["ppo_token_mean"]
    tx = make_optimizer(OptimConfig(lr=LR))
    step = _step(config, loss_name, loss_cfg, view, tx)
    state = TrainState.create(adapters, tx)
    full, _ = step(state, split_micro(batch, None), params)
    parts, _ = step(state, split_micro(batch, 4), params)
    diffs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), full.params, parts.params)
    assert max(jax.tree.leaves(diffs)) <= PARAM_TOL, diffs
    # every adapter trained, vision ones included; b moved off zero
    assert all(float(jnp.abs(p.b).max()) > 0 for p in full.params.values())
    assert any(k.startswith("vision.") for k in full.params)
    assert isinstance(full.params["text.layers.q_proj"], LoraPair)
