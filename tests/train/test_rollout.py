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
from vlmgym_train.batch import build_batch, slice_rows
from vlmgym_train.rollout import (
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
    inputs = batch.inputs
    assert inputs.targets.shape == (6, 6) and batch.mask.shape == (6, 6)
    np.testing.assert_array_equal(batch.trajectory, np.arange(6))
    # the 3 samples of each prompt share one prompt row, and only it gets image features:
    # its 4 placeholders, fed from its own image
    assert inputs.prompts.ids.shape == (2, 64)
    np.testing.assert_array_equal(inputs.row_prompt, [0, 0, 0, 1, 1, 1])
    images = inputs.prompts.images
    assert images is not None and len(images.rows) == 2 * 4
    np.testing.assert_array_equal(np.unique(images.rows), [0, 1])
    statics = CompletionStatics(logprob_chunk=5)
    with jax.default_matmul_precision("highest"):
        logp, entropy = compute_logprobs(params, inputs, config=config, statics=statics)
    m = batch.mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logp)[m], batch.old_logp[m], atol=tol["float32"])
    assert (np.asarray(entropy)[m] > 0).all()
    # a minibatch of rows from both prompts, in another order: the same rows' log-probs,
    # with the prompt count kept (static shapes) and its unused slot empty
    rows = [4, 0, 2]
    sub = slice_rows(batch, rows)
    assert sub.inputs.prompts.ids.shape == (2, 64)
    np.testing.assert_array_equal(sub.inputs.row_prompt, [1, 0, 0])
    np.testing.assert_array_equal(sub.trajectory, [4, 0, 2])
    np.testing.assert_array_equal(sub.old_logp, batch.old_logp[rows])
    with jax.default_matmul_precision("highest"):
        sub_logp, _ = compute_logprobs(params, sub.inputs, config=config, statics=statics)
    np.testing.assert_allclose(
        np.asarray(sub_logp)[m[rows]], np.asarray(logp)[rows][m[rows]], atol=tol["float32"]
    )
    one = slice_rows(sub, [1])  # one row: one prompt slot
    assert one.inputs.prompts.ids.shape == (1, 64) and list(one.inputs.row_prompt) == [0]
    # slicing every row in order gives the batch back
    same = slice_rows(batch, np.arange(6))
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(batch), strict=True):
        np.testing.assert_array_equal(a, b)
    # and the rows agree with a plain forward over prompt + completion
    traj0 = trajs[0]
    _, obs = env.reset(traj0.task)
    inp = processor([obs.messages])
    prompt = inp["input_ids"][0]
    targets = batch.inputs.targets
    seq = np.concatenate([prompt, targets[0][: int(batch.mask[0].sum())]])[None]
    with jax.default_matmul_precision("highest"):
        logits = np.asarray(
            forward(params, config, seq, None, inp["pixel_values"], inp["image_grid_thw"])
        )[0]
    n = int(batch.mask[0].sum())
    ref = jax.nn.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + n], axis=-1)
    ref = np.take_along_axis(np.asarray(ref), targets[0][:n, None], axis=-1)[:, 0]
    np.testing.assert_allclose(np.asarray(logp)[0, :n], ref, atol=tol["float32"])


def test_selection_drops_rows_and_their_images(setup):
    config, params, _, sampler, env = setup
    sp = SamplingParams(max_new_tokens=4, temperature=1.0, num_samples=2)
    a = run_groups(env, sampler, params, [1, 2], sp, jax.random.key(1))
    b = run_groups(env, sampler, params, [3], sp, jax.random.key(2))
    trajs, turns = merge_rounds([a[:2], b[:2]])
    assert [t.group for t in trajs] == [0, 0, 1, 1, 2, 2]
    batch = build_batch(config, turns, 4, sampler.pad_token_id, select=[4, 5, 0, 1])
    assert batch.num_rows == 4
    assert sorted(batch.trajectory.tolist()) == [0, 1, 2, 3]
    prompts = batch.inputs.prompts
    assert prompts.ids.shape[0] == 2 and prompts.images is not None  # group 1 left out
    assert (
        prompts.images.pixel_values.shape[0]
        == 2 * np.asarray(turns[0].generation.image_grid_thw)[0].prod()
    )
    # rows keep their own completions
    by_traj = {int(t): r for r, t in enumerate(batch.trajectory)}
    first = turns[0].generation.samples[0][0].tokens
    np.testing.assert_array_equal(batch.inputs.targets[by_traj[2]][: len(first)], first)


def test_multi_turn_rollouts_add_a_row_per_turn(setup):
    config, params, processor, _, _ = setup
    sampler = Sampler(config, processor, length_buckets=(64, 128))
    env = vlmgym_envs.make("shapes", max_turns=3)
    sp = SamplingParams(max_new_tokens=3, temperature=1.0, num_samples=2)
    trajs, turns, _ = run_groups(env, sampler, params, [0, 1], sp, jax.random.key(3), max_turns=3)
    assert all(t.done and 1 <= t.turns <= 3 for t in trajs)
    batch = build_batch(config, turns, 3, sampler.pad_token_id)
    assert batch.num_rows == sum(t.turns for t in trajs)
    for i, t in enumerate(trajs):
        assert (batch.trajectory == i).sum() == t.turns


def test_equal_later_turn_prompts_are_run_once(setup, tol):
    """Greedy samples of a group are equal, so their second-turn prompts (turn 1, the reply,
    the env's message) are too: each group's turn 2 gets one prompt row, shared by its rows,
    which still reproduce the sampler's log-probs."""
    config, params, processor, _, _ = setup
    sampler = Sampler(config, processor, length_buckets=(64, 128))
    env = vlmgym_envs.make("shapes", max_turns=2)
    sp = SamplingParams(max_new_tokens=3, temperature=0.0, num_samples=3)
    key = jax.random.key(5)
    trajs, turns, _ = run_groups(env, sampler, params, [0, 1, 2], sp, key, max_turns=2)
    second = sorted({t.group for t in trajs if t.turns == 2})
    assert second, "no trajectory took a second turn"
    assert all(sum(t.group == g and t.turns == 2 for t in trajs) == 3 for g in second)
    batch = build_batch(config, turns, 3, sampler.pad_token_id)
    assert batch.num_rows == 9 + 3 * len(second)
    used = np.unique(batch.inputs.row_prompt)
    assert len(used) == 3 + len(second)  # not 3 + 3 * len(second)
    for g in second:  # the group's second-turn rows share one prompt
        rows = [r for r in range(batch.num_rows) if trajs[batch.trajectory[r]].group == g]
        assert len({int(batch.inputs.row_prompt[r]) for r in rows}) == 2
    statics = CompletionStatics(logprob_chunk=5)
    with jax.default_matmul_precision("highest"):
        logp, _ = compute_logprobs(params, batch.inputs, config=config, statics=statics)
    m = batch.mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logp)[m], batch.old_logp[m], atol=tol["float32"])


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
        prompt_tokens = np.asarray(batch.inputs.prompts.segment_ids).sum(axis=1)
        return sorted(
            range(batch.num_rows),
            key=lambda r: (batch.trajectory[r], prompt_tokens[batch.inputs.row_prompt[r]]),
        )

    def rows(batch, order):
        inputs, prompts = batch.inputs, batch.inputs.prompts
        p = inputs.row_prompt[order]
        return {
            "targets": inputs.targets[order],
            "mask": batch.mask[order],
            "trajectory": batch.trajectory[order],
            "positions": inputs.positions[:, order],
            "prompt_ids": prompts.ids[p],
            "prompt_segment_ids": prompts.segment_ids[p],
            "prompt_positions": prompts.positions[:, p],
        }

    ra, rb = rows(ba, key_rows(ba)), rows(bb, key_rows(bb))
    for name in ra:
        np.testing.assert_array_equal(ra[name], rb[name], err_msg=name)
    # log-probs of the same tokens, computed in batches of 4 vs 2 prompts: equal up to the
    # matmul's summation order
    np.testing.assert_allclose(
        ba.old_logp[key_rows(ba)], bb.old_logp[key_rows(bb)], atol=tol["float32"], rtol=0
    )
    ia, ib = ba.inputs.prompts.images, bb.inputs.prompts.images
    assert ia is not None and ib is not None
    np.testing.assert_array_equal(
        np.sort(ia.pixel_values, axis=0), np.sort(ib.pixel_values, axis=0)
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
        def generate_ids(self, *args, **kwargs):
            out = super().generate_ids(*args, **kwargs)
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
