"""GRPO steps on real weights: each loss family on the xla attention, and the Pallas kernel
(interpreted on CPU). The jnp reference's gradients under huge masked scores are checked in
tests/kernels/test_masked_extremes.py.

Tiny random models never produced the large attention scores that made the xla attention's
gradients NaN on a real checkpoint (the exp of a masked score overflowed, and 0 * inf in the
backward pass spread NaN from layer 8 down to the embeddings). Here a batch is sampled from
the real 0.5B model (two chat prompts of different lengths, so rows are left-padded), and
three updates are taken on it with the trainer's own `train_step`, asserting each time that:

- the loss and every gradient are finite and the update was not skipped,
- the update changed the params,
- the loss on the same batch is lower after the update than before it;

and, before the first update, that the trainer's log-probs (each prompt run once for its
samples) are the sampler's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np
import pytest
from vlmgym_envs import Env, Observation, StepResult, user_message
from vlmgym_model import CompletionStatics, Processor, load_model, param_specs
from vlmgym_model.lora import LoraConfig, init_adapters
from vlmgym_model.sampling import Sampler, SamplingParams
from vlmgym_train.advantages import grpo
from vlmgym_train.batch import Batch, build_batch
from vlmgym_train.checkpointing import TrainState
from vlmgym_train.grpo import train_step
from vlmgym_train.losses import LossConfig
from vlmgym_train.microbatch import PolicyView, micro_logprobs, split_micro
from vlmgym_train.optim import OptimConfig, make_optimizer
from vlmgym_train.rollout import run_groups

PROMPTS = (
    "Name a colour.",
    "In one short sentence, what does a Python list comprehension do?",
)
GROUP = 3
NEW_TOKENS = 8
LR = 2e-6


class LengthEnv(Env[int]):
    """Two text prompts; the reward is the answer's length (never tied between samples)."""

    def __len__(self) -> int:
        return len(PROMPTS)

    def reset(self, idx: int) -> tuple[int, Observation]:
        return idx, Observation([user_message(PROMPTS[self.check_index(idx)])])

    def step(self, state: int, text: str) -> StepResult[int]:
        return StepResult(reward=len(text) / 40.0, done=True)


@pytest.fixture(scope="module")
def real_batch(real_dirs) -> tuple[Any, Batch]:
    """A sampled batch of 2 prompts x 3 completions, ready for `train_step`."""
    config, params = load_model(real_dirs.model_dir, dtype=jax.numpy.float32)
    sampler = Sampler(config, Processor.from_model_dir(real_dirs.model_dir))
    sampling = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, num_samples=GROUP)
    trajs, turns, _ = run_groups(LengthEnv(), sampler, params, [0, 1], sampling, jax.random.key(0))
    batch = build_batch(config, turns, NEW_TOKENS, sampler.pad_token_id, prompt_slots=2)
    prompts = batch.inputs.prompts
    assert prompts.segment_ids[0].sum() < prompts.ids.shape[1]  # left padding
    rewards = np.array([t.reward for t in trajs], np.float32).reshape(2, GROUP)
    advantages = np.asarray(grpo(rewards)).reshape(-1)[batch.trajectory]
    assert (np.abs(advantages) > 0.1).all()
    return config, dataclasses.replace(batch, advantages=advantages)


CASES = [("ppo_clip", "xla"), ("gspo", "xla"), ("reinforce", "xla")]
CASES += [("ppo_clip", "pallas_interpret")]


@pytest.mark.parametrize(("loss", "impl"), CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_three_grpo_steps(loss: str, impl: str, real_dirs, real_batch) -> None:
    config, batch = real_batch
    # Fresh params, donated to the step as the trainer does: one copy of the params and
    # moments in memory (AdamW on 630M fp32 params is 7.5 GB already).
    _, params = load_model(real_dirs.model_dir, dtype=jax.numpy.float32)
    statics = CompletionStatics(impl=impl)
    # One clip range for all: GSPO's usual (3e-4, 4e-4) would clip every sequence after
    # the first update at this learning rate, and then no gradient is left to check.
    loss_cfg = LossConfig(clip_low=0.2, clip_high=0.28, aggregation="token_mean")
    tx = make_optimizer(OptimConfig(lr=LR, max_grad_norm=1.0))
    step = jax.jit(
        functools.partial(
            train_step,
            tx=tx,
            config=config,
            statics=statics,
            loss_name=loss,
            loss_cfg=loss_cfg,
            view=PolicyView(jax.numpy.float32),
        ),
        donate_argnums=(0,),
    )
    state = TrainState.create(params, tx)
    del params
    losses = []
    for i in range(3):
        before = np.asarray(state.params.text.layers.q_proj[0, :8, 0, :8])
        state, metrics = step(state, split_micro(batch, None))
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]), (i, m)
        assert m["skipped"] == 0.0 and m["grad_norm"] > 0.0, (i, m)
        if i == 0:  # the trainer's log-probs (shared prompts) are the sampler's, in fp32
            assert m["approx_kl"] < 1e-6 and abs(m["ratio/mean"] - 1.0) < 1e-3, m
        assert not np.array_equal(before, np.asarray(state.params.text.layers.q_proj[0, :8, 0, :8]))
        losses.append(m["loss"])
    # metrics["loss"] is the loss before each update: each update lowered it on this batch.
    assert losses[1] < losses[0] and losses[2] < losses[1], losses
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_lora_steps_in_micro_batches(real_dirs, real_batch, tol) -> None:
    """LoRA (r=8 on attention and MLP; fp32 base for the exact checks) with micro-batches
    of 2 rows: step 0 is the base model (the sampler's log-probs), three
    updates lower the loss, and the micro-batched update equals the whole-batch one."""
    config, batch = real_batch
    _, base = load_model(real_dirs.model_dir, dtype=jax.numpy.float32)
    lora = LoraConfig(rank=8, alpha=16)
    adapters = init_adapters(param_specs(config), lora, jax.random.key(0))
    view = PolicyView(jax.numpy.float32, lora)
    statics = CompletionStatics()
    logp = micro_logprobs(view, adapters, base, split_micro(batch, 2), config=config,
                          statics=statics)[: batch.num_rows]  # fmt: skip
    m = np.asarray(batch.mask) > 0
    np.testing.assert_allclose(np.asarray(logp)[m], batch.old_logp[m], atol=tol["float32"])
    tx = make_optimizer(OptimConfig(lr=1e-4, max_grad_norm=1.0))
    step = jax.jit(
        functools.partial(
            train_step, tx=tx, config=config, statics=statics, loss_name="ppo_clip",
            loss_cfg=LossConfig(clip_low=0.2, clip_high=0.28), view=view,
        )
    )  # fmt: skip
    state = TrainState.create(adapters, tx)
    whole, _ = step(state, split_micro(batch, None), base)
    losses = []
    for i in range(3):
        state, metrics = step(state, split_micro(batch, 2), base)
        m_ = {k: float(v) for k, v in jax.device_get(metrics).items()}
        assert np.isfinite(m_["loss"]) and m_["skipped"] == 0.0 and m_["grad_norm"] > 0, m_
        losses.append(m_["loss"])
        if i == 0:
            diffs = jax.tree.map(
                lambda a, b: float(np.abs(a - b).max()), whole.params, state.params
            )
            assert max(jax.tree.leaves(diffs)) <= 1e-5, diffs
    assert losses[1] < losses[0] and losses[2] < losses[1], losses
