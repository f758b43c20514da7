"""Rollouts and the training rows built from them, checked against the model's forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import vlmgym_envs
from vlmgym_model import (
    CompletionStatics,
    Processor,
    Sampler,
    SamplingParams,
    compute_logprobs,
    forward,
    load_model,
)
from vlmgym_train.policy import slice_rows, to_policy_inputs
from vlmgym_train.rollout import (
    build_batch,
    image_layout_arrays,
    merge_rounds,
    round_from_arrays,
    round_to_arrays,
    run_groups,
)


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    config, params = load_model(tiny_model_dir, dtype=jnp.float32)
    processor = Processor.from_model_dir(tiny_model_dir)
    sampler = Sampler(config, processor, length_buckets=(64,))
    env = vlmgym_envs.make("shapes")
    return config, params, processor, sampler, env


def test_rows_reproduce_the_samplers_logprobs(setup, tol):
    """Rows rebuilt from a rollout give, under the same params, the behaviour log-probs."""
    config, params, processor, sampler, env = setup
    sp = SamplingParams(max_new_tokens=6, temperature=1.0, num_samples=3)
    trajs, turns, _ = run_groups(env, sampler, params, [0, 5], sp, jax.random.key(0))
    assert [t.group for t in trajs] == [0, 0, 0, 1, 1, 1]
    assert all(t.done and t.turns == 1 for t in trajs)
    batch = build_batch(config, turns, 6, sampler.pad_token_id)
    assert batch.input_ids.shape == (6, 64 + 6) and batch.targets.shape == (6, 6)
    np.testing.assert_array_equal(batch.trajectory, np.arange(6))
    # every row carries its prompt's 4 image placeholders, fed from its own image
    assert len(batch.image_rows) == 6 * 4
    assert batch.image_grid_thw is not None and len(batch.image_grid_thw) == 2
    inputs, bounds = to_policy_inputs(batch, image_layout_arrays(config, batch.image_grid_thw))
    # the 3 samples of each prompt share one prompt row, and only it gets the image features
    assert inputs.prompt_ids.shape == (2, 64)
    np.testing.assert_array_equal(inputs.row_prompt, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(np.unique(np.asarray(inputs.image_rows)), [0, 1])
    statics = CompletionStatics(prompt_len=batch.prompt_len, logprob_chunk=5, **bounds)
    with jax.default_matmul_precision("highest"):
        logp, entropy = compute_logprobs(params, inputs, config=config, statics=statics)
    m = batch.mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logp)[m], batch.old_logp[m], atol=tol["float32"])
    assert (np.asarray(entropy)[m] > 0).all()
    # a minibatch of rows from both prompts, in another order: the same rows' log-probs,
    # with the prompt count kept (static shapes) and its unused slot empty
    rows = [4, 0, 2]
    sub = slice_rows(
        to_policy_inputs(
            batch, image_layout_arrays(config, batch.image_grid_thw), asarray=np.asarray
        )[0],
        rows,
    )
    assert sub.prompt_ids.shape == (2, 64)
    np.testing.assert_array_equal(sub.row_prompt, [1, 0, 0])
    with jax.default_matmul_precision("highest"):
        sub_logp, _ = compute_logprobs(params, sub, config=config, statics=statics)
    np.testing.assert_allclose(
        np.asarray(sub_logp)[m[rows]], np.asarray(logp)[rows][m[rows]], atol=tol["float32"]
    )
    one = slice_rows(sub, [1])  # one row: one prompt slot
    assert one.prompt_ids.shape == (1, 64) and list(one.row_prompt) == [0]
    # and the rows agree with a plain forward over prompt + completion
    traj0 = trajs[0]
    _, obs = env.reset(traj0.task)
    inp = processor([obs.messages])
    prompt = inp["input_ids"][0]
    seq = np.concatenate([prompt, batch.targets[0][: int(batch.mask[0].sum())]])[None]
    with jax.default_matmul_precision("highest"):
        logits = np.asarray(
            forward(params, config, seq, None, inp["pixel_values"], inp["image_grid_thw"])
        )[0]
    n = int(batch.mask[0].sum())
    ref = jax.nn.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + n], axis=-1)
    ref = np.take_along_axis(np.asarray(ref), batch.targets[0][:n, None], axis=-1)[:, 0]
    np.testing.assert_allclose(np.asarray(logp)[0, :n], ref, atol=tol["float32"])


def test_selection_drops_rows_and_their_images(setup):
    config, params, _, sampler, env = setup
    sp = SamplingParams(max_new_tokens=4, temperature=1.0, num_samples=2)
    a = run_groups(env, sampler, params, [1, 2], sp, jax.random.key(1))
    b = run_groups(env, sampler, params, [3], sp, jax.random.key(2))
    trajs, turns = merge_rounds([a[:2], b[:2]])
    assert [t.group for t in trajs] == [0, 0, 1, 1, 2, 2]
    batch = build_batch(config, turns, 4, sampler.pad_token_id, select=[4, 5, 0, 1])
    assert batch.input_ids.shape[0] == 4
    assert sorted(batch.trajectory.tolist()) == [0, 1, 2, 3]
    assert batch.image_grid_thw is not None and len(batch.image_grid_thw) == 2  # group 1 left out
    # rows keep their own completions
    by_traj = {int(t): r for r, t in enumerate(batch.trajectory)}
    first = turns[0].generation.samples[0][0].tokens
    np.testing.assert_array_equal(batch.targets[by_traj[2]][: len(first)], first)


def test_multi_turn_rollouts_add_a_row_per_turn(setup):
    config, params, processor, _, _ = setup
    sampler = Sampler(config, processor, length_buckets=(64, 128))
    env = vlmgym_envs.make("shapes", max_turns=3)
    sp = SamplingParams(max_new_tokens=3, temperature=1.0, num_samples=2)
    trajs, turns, _ = run_groups(env, sampler, params, [0, 1], sp, jax.random.key(3), max_turns=3)
    assert all(t.done and 1 <= t.turns <= 3 for t in trajs)
    batch = build_batch(config, turns, 3, sampler.pad_token_id)
    assert batch.input_ids.shape[0] == sum(t.turns for t in trajs)
    for i, t in enumerate(trajs):
        assert (batch.trajectory == i).sum() == t.turns


def test_shares_of_a_round_equal_the_whole_round(setup, tol):
    """What two processes roll out (each its share, then exchanged as arrays) equals what
    one process rolls out, sample for sample, over several turns."""
    config, params, processor, _, _ = setup
    sampler = Sampler(config, processor, length_buckets=(64, 128))
    env = vlmgym_envs.make("shapes", max_turns=2)
    sp = SamplingParams(max_new_tokens=3, temperature=1.0, num_samples=2)
    key = jax.random.key(4)
    whole, whole_turns, _ = run_groups(env, sampler, params, [0, 1, 2, 3], sp, key, max_turns=2)
    shares = [
        run_groups(env, sampler, params, tasks, sp, key, max_turns=2, group_offset=offset)[:2]
        for tasks, offset in (([0, 1], 0), ([2, 3], 2))
    ]
    merged, merged_turns = merge_rounds(
        [round_from_arrays(round_to_arrays(*share)) for share in shares]
    )
    assert [t.group for t in merged] == [t.group for t in whole] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert any(t.turns == 2 for t in whole), "no trajectory took a second turn"
    for a, b in zip(whole, merged, strict=True):
        assert (a.task, a.texts, a.reward, a.turns) == (b.task, b.texts, b.reward, b.turns)
        assert a.info["finish_reason"] == b.info["finish_reason"]
    ba = build_batch(config, whole_turns, 3, sampler.pad_token_id)
    bb = build_batch(config, merged_turns, 3, sampler.pad_token_id)

    # rows come in another order (share by share); match them by (trajectory, prompt)
    def key_rows(batch):
        return sorted(
            range(len(batch.trajectory)),
            key=lambda r: (batch.trajectory[r], int(batch.segment_ids[r].sum())),
        )

    ra, rb = key_rows(ba), key_rows(bb)
    for name in ("targets", "mask", "input_ids", "segment_ids", "trajectory"):
        np.testing.assert_array_equal(getattr(ba, name)[ra], getattr(bb, name)[rb], err_msg=name)
    # log-probs of the same tokens, computed in batches of 4 vs 2 prompts: equal up to the
    # matmul's summation order
    np.testing.assert_allclose(ba.old_logp[ra], bb.old_logp[rb], atol=tol["float32"], rtol=0)
    np.testing.assert_array_equal(ba.positions[:, ra], bb.positions[:, rb])
    assert ba.pixel_values is not None and bb.pixel_values is not None
    np.testing.assert_array_equal(
        np.sort(ba.pixel_values, axis=0), np.sort(bb.pixel_values, axis=0)
    )


def test_chunked_rollouts_score_while_decoding(setup):
    """chunks=2: the same samples and rewards, and chunk 0 is scored while chunk 1 decodes."""
    import threading
    import time

    config, params, processor, sampler, _ = setup
    events: list[tuple[str, float, str]] = []

    class Timed(vlmgym_envs.shapes.ShapesEnv):
        def step_many(self, states, texts):
            events.append(("score", time.perf_counter(), threading.current_thread().name))
            return super().step_many(states, texts)

    class TimedSampler(Sampler):
        def generate(self, *args, **kwargs):
            out = super().generate(*args, **kwargs)
            events.append(("generated", time.perf_counter(), threading.current_thread().name))
            return out

    timed = TimedSampler(config, processor, length_buckets=(64,))
    env = Timed()
    sp = SamplingParams(max_new_tokens=3, temperature=1.0, num_samples=2)
    key = jax.random.key(5)
    whole, _, _ = run_groups(env, sampler, params, [4, 5, 6, 7], sp, key)
    events.clear()
    chunked, turns, _ = run_groups(env, timed, params, [4, 5, 6, 7], sp, key, chunks=2)
    assert len(turns) == 2 and [len(t.trajectories) for t in turns] == [2, 2]
    for a, b in zip(whole, chunked, strict=True):
        assert (a.task, a.group, a.texts, a.reward) == (b.task, b.group, b.texts, b.reward)
    kinds = [e[0] for e in events]
    assert kinds.count("score") == 2 and kinds.count("generated") == 2
    first_score = next(e for e in events if e[0] == "score")
    second_generated = [e for e in events if e[0] == "generated"][1]
    assert first_score[2].startswith("vlmgym-reward"), "scoring ran on the main thread"
    assert first_score[1] < second_generated[1], "chunk 0 was not scored during chunk 1"
