"""The original project's options: adaptive KL, global advantage normalisation, advantage
clipping, recomputed behaviour log-probs, env metrics per step; each against numpy
references written from the formulas of the issue."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
import vlmgym_envs
from vlmgym_envs.shapes import ShapesEnv
from vlmgym_model import parse_args
from vlmgym_train.advantages import clip_advantages, global_normalise, parse_clip_range
from vlmgym_train.config import TrainConfig
from vlmgym_train.grpo import collect_groups, score_groups
from vlmgym_train.kl_control import KLController, adapt_kl_coef
from vlmgym_train.losses import LossConfig, LossInputs, get_loss
from vlmgym_train.trainer import Trainer


def reference_controller(coef: float, kls: list[float], target: float) -> list[float]:
    """The rule as the issue states it, step by step."""
    out = []
    for kl in kls:
        if kl == kl:  # not NaN
            if kl > max(0.5, 5 * target):
                coef = coef * 1.5 * 1.5
            elif kl > 2 * target:
                coef = coef * 1.5
            elif kl < 0.5 * target:
                coef = coef / 1.5
            coef = min(max(coef, 1e-5), 0.5)
        out.append(coef)
    return out


def test_kl_controller_follows_the_rule_over_a_scripted_kl_sequence():
    target = 0.02
    kls = [0.001, 0.02, 0.03, 0.05, 0.09, 0.2, 0.6, float("nan"), 0.011, 0.0099, 0.04]
    kls += [1e-9] * 40 + [3.0] * 20  # down to the floor, then up to the cap
    controller = KLController(0.04, target)
    got = [controller.update(kl) for kl in kls]
    np.testing.assert_allclose(got, reference_controller(0.04, kls, target), rtol=1e-12)
    assert got[0] == pytest.approx(0.04 / 1.5)  # below T/2
    assert got[1] == got[0]  # inside [T/2, 2T]
    assert got[3] == pytest.approx(got[2] * 1.5)  # 2T < 0.05 <= max(0.5, 5T)
    assert got[6] == pytest.approx(got[5] * 2.25)  # above max(0.5, 5T) = 0.5
    assert got[7] == got[6]  # a NaN KL leaves it alone
    assert min(got) == 1e-5 and got[-1] == 0.5
    # with a large target, 5T is the threshold of the double step
    assert adapt_kl_coef(0.1, 0.9, 0.2) == pytest.approx(0.15)
    assert adapt_kl_coef(0.1, 1.01, 0.2) == pytest.approx(0.225)
    assert KLController(0.3).update(10.0) == 0.3  # no target: fixed


def test_global_normalisation_and_clipping_match_numpy():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [0.3, 0.3, 0.3, 0.3], [2.0, 0.5, 0.0, 1.0]])
    group = (rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, keepdims=True) + 1e-6)
    ref = (group - group.mean()) / (group.std() + 1e-6)
    got = np.asarray(global_normalise(jnp.asarray(group, jnp.float32), eps=1e-6))
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert (got[1] == got[1, 0]).all()  # an equal group stays equal (not 0: the mean moved)
    assert np.asarray(global_normalise(jnp.zeros((2, 3)))).tolist() == [[0.0] * 3] * 2
    np.testing.assert_array_equal(
        np.asarray(clip_advantages(got, *parse_clip_range("0,inf"))), np.maximum(got, 0)
    )
    np.testing.assert_allclose(
        np.asarray(clip_advantages(got, *parse_clip_range("0.5"))), np.clip(got, -0.5, 0.5)
    )


@pytest.mark.parametrize("text", ["0", "-1", "1,0", "a", "1,2,3", "nan", "0,nan", ""])
def test_bad_clip_ranges_are_one_line_errors(text):
    with pytest.raises(ValueError, match="--advantage_clip"):
        parse_clip_range(text)
    with pytest.raises(ValueError, match="--advantage_clip"):
        TrainConfig.flat(advantage_clip=text)


def test_kl_target_config():
    cfg = TrainConfig.flat(kl_target=0.02).resolved()
    assert cfg.algorithm.kl_coef == 0.04  # the starting value when none is given
    assert TrainConfig.flat(kl_target=0.02, kl_coef=0.1).resolved().algorithm.kl_coef == 0.1
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="--kl_target"):
            TrainConfig.flat(kl_target=bad)
    with pytest.raises(ValueError, match="--kl_coef"):
        TrainConfig.flat(kl_coef=math.inf)


def test_the_original_flag_spellings_parse():
    cfg = parse_args(TrainConfig, ["--do_global_normalization", "1", "--do_group_filter", "1"])
    assert cfg.algorithm.advantage_global_norm and cfg.algorithm.dynamic_sampling


def test_the_batch_kl_coefficient_replaces_the_configs():
    rng = np.random.default_rng(0)
    logp = jnp.asarray(rng.normal(-2, 0.5, (3, 5)), jnp.float32)
    base = dict(
        logp=logp, old_logp=logp - 0.01, mask=jnp.ones((3, 5)),
        advantages=jnp.asarray([1.0, -0.5, 0.2]), ref_logp=logp + 0.3,
    )  # fmt: skip
    loss = get_loss("ppo_clip")
    fixed, _ = loss(LossInputs(**base), LossConfig(kl_coef=0.25))
    steered, _ = loss(LossInputs(**base, kl_coef=jnp.float32(0.25)), LossConfig(kl_coef=1.0))
    assert float(steered) == pytest.approx(float(fixed), rel=1e-6)


class MetricShapes(ShapesEnv):
    """`shapes` whose step metrics count the step's episodes, and which keeps a count of
    the episodes it scored in its checkpointed state (as a curriculum does)."""

    scored = 0

    def step(self, state, text):
        self.scored += 1
        return super().step(state, text)

    def step_metrics(self, infos):
        return {"episodes": float(len(infos))}

    def state_dict(self):
        return {"scored": self.scored}

    def load_state_dict(self, state):
        self.scored = state["scored"]


def test_trainer_runs_the_original_options_and_resumes_the_controller(tmp_path):
    vlmgym_envs.register("metric_shapes", MetricShapes, overwrite=True)
    try:
        cfg = TrainConfig.flat(
            env_name="metric_shapes", save_dir=str(tmp_path), groups_per_batch=2,
            group_size=4, num_generation_tokens=3, total_steps=2, kl_target=0.02,
            kl_coef=0.1, lr=1e-12, recompute_behaviour_logprobs=True,
            advantage_global_norm=True, advantage_clip="0,inf", progress=False, seed=2,
        )  # fmt: skip
        trainer = Trainer(cfg)
        m0 = trainer.step(0)
        m1 = trainer.step(1)
        # The params barely move, so the KL to the reference is ~0: the coefficient falls.
        assert m0["kl/coef"] == 0.1 and m1["kl/coef"] == pytest.approx(0.1 / 1.5)
        assert trainer.kl.coef == pytest.approx(0.1 / 1.5**2)
        # The sampler's log-probs equal the trainer's (same code, fp32), and after
        # recomputing them the ratio is 1.
        assert m0["logprob/sampler_gap_max"] < 1e-4, m0
        assert abs(m0["ratio/mean"] - 1.0) < 1e-6 and m0["approx_kl"] < 1e-9
        assert m0["env/episodes"] == 8.0
        rollouts = collect_groups(trainer.setup, trainer.rollout_params(), 0)
        _, _, rewards, advantages = score_groups(trainer.setup, rollouts)
        assert advantages.min() >= 0.0  # clipped at 0
        if rewards.std() > 0:
            assert advantages.max() > 0
        trainer.save(2, force=True)
        trainer.checkpointer.wait()
        resumed = Trainer(cfg.replace(resume=True))
        assert resumed.kl.coef == trainer.kl.coef
        assert resumed.env.scored == trainer.env.scored == 24  # 3 rollouts of 8
    finally:
        vlmgym_envs.unregister("metric_shapes")
