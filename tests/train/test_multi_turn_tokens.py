"""Multi-turn rollouts are token-exact: every turn's training row is the tokens the sampler
drew, after exactly the tokens it read, with the images where it saw them."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures.multi_turn import check_token_exact, image
from vlmgym_envs import user_message
from vlmgym_model import Processor, Sampler, load_model
from vlmgym_model.turns import TokenPrompt, continuation, encode_conversations, pad_prompts


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    config, params = load_model(tiny_model_dir, dtype=jnp.float32)
    processor = Processor.from_model_dir(tiny_model_dir)
    return config, params, processor


def test_three_turns_with_images_are_token_exact(tiny, tol):
    config, params, processor = tiny
    sampler = Sampler(config, processor, length_buckets=(64, 128, 256))
    check_token_exact(config, params, sampler, jax.random.key(11), 6, tol["float32"])


def test_continuation_is_the_templates_rendering(tiny):
    """The appended tokens are what the chat template writes after an assistant turn (less
    the stop token already sampled); a reply cut by the length limit gets the closing too."""
    _, _, processor = tiny
    first = [user_message("what colour ?", [image(0, 56)])]
    new = [user_message("page two :", [image(1, 28)])]
    (prompt,) = encode_conversations(processor, [first])
    reply = processor.encode("red")
    stop = processor.encode("<|im_end|>")
    assert len(stop) == 1
    tail = continuation(processor, new, stop_token=stop[0])
    whole = prompt.extend(TokenPrompt(np.asarray(reply + stop, np.int32))).extend(tail)
    conversation = [*first, {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    (rendered,) = encode_conversations(processor, [conversation + new])
    np.testing.assert_array_equal(whole.ids, rendered.ids)
    np.testing.assert_array_equal(whole.image_grid_thw, rendered.image_grid_thw)
    np.testing.assert_array_equal(whole.pixel_values, rendered.pixel_values)
    cut = continuation(processor, new, stop_token=None)  # no stop sampled: closing written
    assert len(cut) == len(tail) + 1 and cut.ids[0] == stop[0]
    batch = pad_prompts([prompt, whole], processor.pad_token_id)
    assert batch["input_ids"].shape == (2, len(whole))
    assert batch["image_grid_thw"].shape == (3, 3)


def test_replies_with_image_placeholders_end_the_episode(tiny):
    """A reply holding an image placeholder has no image to give it: the episode ends
    there rather than continue with a prompt the images do not match."""
    from vlmgym_model import Sample
    from vlmgym_train.rollout import Trajectory, _continue_prompt

    config, _, processor = tiny
    sampler = Sampler(config, processor, length_buckets=(64, 128))
    (prompt,) = encode_conversations(processor, [[user_message("what colour ?")]])
    traj = Trajectory(task=0, group=0, messages=[], state=0, prompt=prompt)
    bad = np.asarray([processor.image_token_id, 5], np.int32)
    sample = Sample(0, bad, np.zeros(2, np.float32), np.zeros(2, np.float32), "length")
    _continue_prompt(sampler, traj, sample)
    assert traj.done and traj.info["placeholder_in_reply"] and traj.prompt is prompt


def test_evaluation_records_every_turn(tiny, tmp_path):
    """`max_turns` > 1: one record per episode, each turn with its text, tool calls, reward
    and the sizes of the images returned after it; the same records whatever the batch."""
    from fixtures.multi_turn import PictureBook
    from vlmgym_train.evaluate import EvalConfig, evaluate

    config, params, processor = tiny
    sampler = Sampler(config, processor, length_buckets=(64, 128, 256))
    cfg = EvalConfig(max_eval_tasks=3, num_generation_tokens=5, temperature=1.0, max_turns=3)
    one = evaluate(params, sampler, PictureBook(), dataclasses.replace(cfg, batch_size=1))
    out = tmp_path / "eval"
    two = evaluate(params, sampler, PictureBook(), dataclasses.replace(cfg, batch_size=2), out)
    assert one.records == two.records
    lines = (out / "records.jsonl").read_text().splitlines()
    assert [json.loads(line)["task"] for line in lines] == [r["task"] for r in two.records]
    full = [r for r in two.records if r["num_turns"] == 3]
    assert full, "no episode reached its third turn"
    turns = full[0]["turns"]
    assert [t["returned_images"] for t in turns] == [[[28, 28]], [[56, 56]], []]
    assert [t["reward"] for t in turns[:2]] == [0.5, 0.5]
    assert full[0]["reward"] == sum(t["reward"] for t in turns)
    metrics = two.metrics
    assert metrics["turns/mean"] == np.mean([r["num_turns"] for r in two.records])
    assert metrics["reward/turn_1"] == 0.5 and metrics["tool_calls/rate"] == 0.0


def test_multi_turn_step_on_8_devices_equals_one(tmp_path, tol):
    """A 3-turn step (images returned in turns 2 and 3) on a (data 2, fsdp 2, tensor 2)
    mesh of 8 simulated devices samples the same tokens and takes the same update."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    script = Path(__file__).parent / "sharded_multi_turn.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True, text=True, timeout=1200, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    found = dict(re.findall(r"(\w+)=(\S+)", proc.stdout))
    assert found["tokens_equal"] == "True" and int(found["turns"]) == 3
    assert float(found["max_logp_diff"]) <= tol["float32"]
    assert float(found["loss_diff"]) <= tol["float32"]
    assert float(found["max_param_diff"]) <= tol["float32"]
