"""Rollouts: tasks from an environment, group samples from the sampling engine, rewards.

For each of `groups_per_batch` tasks the sampler draws `group_size` completions from one
prefill; the environment scores each completion's text. A multi-turn environment that
answers `done=False` gets its next observation appended to that sample's conversation and
the sample is continued, up to `max_turns`.

Turns continue token-exactly (`vlmgym_model.turns`): turn k+1's prompt is turn k's prompt,
the tokens the sampler drew and the tokens of the env's new messages (their images
processed once, where they arrive), never the conversation re-rendered from decoded text.
A trajectory whose next prompt would not fit the sampler's largest length bucket ends
there (`info["context_full"]`).

Every turn becomes one training row (`vlmgym_train.batch.build_batch`): the prompt it was
sampled from, the tokens actually sampled (the loss mask covers exactly those), and their
behaviour log-probs. A trajectory's reward is the sum of its turns' rewards; all its rows
share its advantage (optionally discounted per turn: `advantages.discount_turns`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from vlmgym_envs import Env, Observation, SkipTask, StepResult
from vlmgym_envs.data.archives import DataError
from vlmgym_model import (
    Generation,
    Sample,
    Sampler,
    SamplingParams,
    TokenPrompt,
    continuation,
    encode_conversations,
    pad_prompts,
)

from vlmgym_train.jsonable import jsonable

log = logging.getLogger("vlmgym_train")


@dataclasses.dataclass
class Trajectory:
    """One sample of one task, over all its turns."""

    task: int  # index into the environment
    group: int  # which group of the batch
    messages: list[dict[str, Any]]
    state: Any
    reward: float = 0.0
    done: bool = False
    turns: int = 0
    texts: list[str] = dataclasses.field(default_factory=list)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    # the next turn's prompt as exact tokens (`vlmgym_model.turns`), set once sampled from
    prompt: TokenPrompt | None = None
    rewards: list[float] = dataclasses.field(default_factory=list)  # per turn
    appended: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # last turn's
    # [width, height] of each image the env returned after each turn
    returned_images: list[list[list[int]]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class TurnRows:
    """The training rows of one `Sampler.generate` call (one turn of many trajectories)."""

    generation: Generation
    trajectories: list[int]  # trajectory index of each prompt of the generation


def _append_assistant(messages: list[dict[str, Any]], text: str) -> None:
    messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})


def _keys(key: jax.Array, indices: np.ndarray) -> jax.Array:
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(indices, jnp.uint32))


# how many following tasks a bad one's replacement is looked for in
MAX_REPLACEMENTS = 64


def reset_or_replace(env: Env, task: int) -> tuple[int, Any, Observation, int]:
    """`env.reset(task)`, or when the env cannot show that task (`SkipTask`: a corrupt
    image...) the next task that it can show, looking at task + 1, task + 2, ... Returns
    (the task reset, its state, its observation, how many tasks were skipped). The choice
    depends only on the data, so every process and every resume makes the same one."""
    size = len(env)
    for skipped in range(min(MAX_REPLACEMENTS, size)):
        candidate = (task + skipped) % size
        try:
            state, obs = env.reset(candidate)
        except SkipTask as err:
            log.warning("task %d skipped (%s): %s", candidate, err.reason, err)
            continue
        return candidate, state, obs, skipped
    raise DataError(
        f"{MAX_REPLACEMENTS} tasks in a row from task {task} could not be read "
        f"({env.skipped() or 'no counts'}); check the dataset"
    )


class UnreadableTasks:
    """A run's count of tasks that could not be read, against the tasks it tried; too many
    stop the run (`--max_skip_fraction`, checked once 20 tasks were tried)."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.tried = self.unreadable = 0.0

    def count(self, metrics: dict[str, float], env: Env) -> None:
        """Add a step's counts (its `rollout/groups_local`, `data/skipped_tasks`); put the
        env's cumulative counts per reason in `metrics` (`data/skipped/<reason>`)."""
        skipped = metrics.get("data/skipped_tasks", 0.0)
        self.tried += metrics.get("rollout/groups_local", 0.0) + skipped
        self.unreadable += skipped
        for reason, n in env.skipped().items():
            metrics[f"data/skipped/{reason}"] = float(n)
        if self.tried >= 20 and self.unreadable > self.limit * self.tried:
            raise DataError(
                f"{int(self.unreadable)} of {int(self.tried)} tasks could not be read "
                f"({env.skipped()}), more than --max_skip_fraction {self.limit}; check the "
                "dataset"
            )

    def postfix(self) -> dict[str, int]:
        """For the progress bar: the count, once there is one."""
        return {"unreadable": int(self.unreadable)} if self.unreadable else {}


def _start_groups(env: Env, tasks: Sequence[int], n: int) -> tuple[list[Trajectory], int]:
    """`n` fresh trajectories per task (group g = the g-th task), at the env's first turn;
    and how many tasks were skipped as unreadable (each replaced by a readable one)."""
    trajectories = []
    skipped_total = 0
    for g, wanted in enumerate(tasks):
        task, state, obs, skipped = reset_or_replace(env, int(wanted))
        skipped_total += skipped
        for _ in range(n):
            trajectories.append(
                Trajectory(task=int(task), group=g, messages=list(obs.messages), state=state)
            )
    return trajectories, skipped_total


def run_groups(
    env: Env,
    sampler: Sampler,
    params: Any,
    tasks: Sequence[int],
    sampling: SamplingParams,
    key: jax.Array,
    *,
    max_turns: int = 1,
    group_offset: int = 0,
    chunks: int = 1,
) -> tuple[list[Trajectory], list[TurnRows], dict[str, float]]:
    """Sample `sampling.num_samples` trajectories for each task and score them.

    Task g draws its first turn from `fold_in(key_turn, group_offset + g)` and trajectory i
    continues from `fold_in(key_turn, group_offset * n + i)`: a process rolling out a share
    of a step (`group_offset` = the global index of its first task) draws exactly the
    samples a single process rolling out the whole step would.

    `chunks` > 1 splits each turn's prompts into that many `Sampler.generate` calls and
    scores a chunk's completions (`env.step_many`, in a worker thread) while the next chunk
    decodes. The samples do not depend on the chunking (keys are per prompt).
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    n = sampling.num_samples
    t0 = time.perf_counter()
    trajectories, skipped = _start_groups(env, tasks, n)
    t_reset = time.perf_counter() - t0
    turns: list[TurnRows] = []
    t_sample = t_wait = 0.0
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmgym-reward")
    try:
        for turn in range(max_turns):
            live = [i for i, t in enumerate(trajectories) if not t.done]
            if not live:
                break
            key, sub = jax.random.split(key)
            # turn 0: one prompt per task (its KV rows copied to the task's n samples);
            # later turns: one prompt per live trajectory
            heads = live[::n] if turn == 0 else live
            turn_sampling = sampling if turn == 0 else dataclasses.replace(sampling, num_samples=1)
            pending: list[tuple[list[int], list[Sample], Future[list[StepResult]]]] = []
            for part in np.array_split(np.arange(len(heads)), max(1, min(chunks, len(heads)))):
                owners = [heads[int(j)] for j in part]
                if turn == 0:
                    keys = _keys(sub, group_offset + part)
                else:
                    keys = _keys(sub, group_offset * n + np.asarray(owners))
                t1 = time.perf_counter()
                if turn == 0:  # one prompt per group, shared by its n trajectories
                    _encode_first_turn(sampler, trajectories, owners, n)
                prompts = [trajectories[i].prompt for i in owners]
                gen = _generate(sampler, params, prompts, turn_sampling, keys)
                t_sample += time.perf_counter() - t1
                turns.append(TurnRows(generation=gen, trajectories=owners))
                samples = [s for group in gen.samples for s in group]
                sample_owner = (
                    [o + j for o in owners for j in range(n)] if turn == 0 else list(owners)
                )
                states = [trajectories[i].state for i in sample_owner]
                future = pool.submit(env.step_many, states, [s.text for s in samples])
                pending.append((sample_owner, samples, future))
            t2 = time.perf_counter()
            for sample_owner, samples, future in pending:
                results = future.result()
                for i, sample, result in zip(sample_owner, samples, results, strict=True):
                    _record(trajectories[i], sample, result, last_turn=turn == max_turns - 1)
                    if not trajectories[i].done:
                        _continue_prompt(sampler, trajectories[i], sample)
            t_wait += time.perf_counter() - t2
    finally:
        pool.shutdown(wait=True)
    return (
        trajectories,
        turns,
        {
            "time/reset_s": t_reset,
            "data/skipped_tasks": float(skipped),  # unreadable, replaced
            "time/sample_s": t_sample,
            "time/reward_s": t_wait,  # scoring not hidden behind decoding
        },
    )


def _encode_first_turn(
    sampler: Sampler, trajectories: list[Trajectory], heads: list[int], n: int
) -> None:
    """Tokenise the first-turn conversation of each group (`heads`: the index of its
    first trajectory) and give the prompt to the group's n trajectories."""
    prompts = encode_conversations(
        sampler.processor,
        [trajectories[i].messages for i in heads],
        min_pixels=sampler.min_pixels,
        max_pixels=sampler.max_pixels,
    )
    for head, prompt in zip(heads, prompts, strict=True):
        for j in range(n):
            trajectories[head + j].prompt = prompt


def _generate(
    sampler: Sampler,
    params: Any,
    prompts: Sequence[TokenPrompt | None],
    sampling: SamplingParams,
    keys: jax.Array,
) -> Generation:
    ready = [p for p in prompts if p is not None]
    assert len(ready) == len(prompts), "a trajectory was sampled before it was tokenised"
    inputs = pad_prompts(ready, sampler.pad_token_id)
    return sampler.generate_ids(
        params,
        inputs["input_ids"],
        inputs["attention_mask"],
        sampling,
        keys,
        pixel_values=inputs["pixel_values"],
        image_grid_thw=inputs["image_grid_thw"],
    )


def _record(traj: Trajectory, sample: Sample, result: StepResult, *, last_turn: bool) -> None:
    """Apply one turn's completion and its env result to a trajectory."""
    traj.turns += 1
    traj.texts.append(sample.text)
    traj.rewards.append(float(result.reward))
    traj.reward += float(result.reward)
    traj.info = dict(result.info)
    traj.info["finish_reason"] = sample.finish_reason
    if result.done or last_turn:
        traj.done = True
        return
    _append_assistant(traj.messages, sample.text)
    traj.appended = []
    if result.observation is not None:
        next_obs = result.observation
        extra = next_obs.messages if isinstance(next_obs, Observation) else next_obs
        traj.messages.extend(extra)
        traj.appended = list(extra)
    traj.returned_images.append(
        [list(image.size) for image in Observation(list(traj.appended)).images]
    )
    if result.state is not None:
        traj.state = result.state


def _placeholder_ids(sampler: Sampler) -> list[int]:
    processor = sampler.processor
    ids = [processor.image_token_id, getattr(processor, "video_token_id", None)]
    return [int(i) for i in ids if i is not None]


def _continue_prompt(sampler: Sampler, traj: Trajectory, sample: Sample) -> None:
    """The trajectory's next prompt: its last prompt + the sampled tokens + the env's new
    messages as the chat template writes them (`vlmgym_model.turns.continuation`)."""
    assert traj.prompt is not None
    if np.isin(sample.tokens, _placeholder_ids(sampler)).any():
        # an image placeholder the model wrote has no image behind it: the prompt cannot
        # go on token-exactly (random models do this; trained ones practically never)
        traj.done = True
        traj.info["placeholder_in_reply"] = True
        return
    tail = continuation(
        sampler.processor,
        traj.appended,
        stop_token=int(sample.tokens[-1]) if sample.finish_reason == "stop" else None,
        min_pixels=sampler.min_pixels,
        max_pixels=sampler.max_pixels,
    )
    sampled = TokenPrompt(np.asarray(sample.tokens, np.int32))
    prompt = traj.prompt.extend(sampled).extend(tail)
    if len(prompt) > sampler.length_buckets[-1]:
        traj.done = True  # no room for another turn: the episode ends here
        traj.info["context_full"] = True
        return
    traj.prompt = prompt


def merge_rounds(
    rounds: Sequence[tuple[list[Trajectory], list[TurnRows]]],
) -> tuple[list[Trajectory], list[TurnRows]]:
    """Concatenate several `run_groups` results (e.g. dynamic-sampling refills)."""
    trajectories: list[Trajectory] = []
    turns: list[TurnRows] = []
    groups = 0
    for trajs, trs in rounds:
        offset = len(trajectories)
        trajectories.extend(dataclasses.replace(t, group=t.group + groups) for t in trajs)
        turns.extend(
            TurnRows(generation=t.generation, trajectories=[o + offset for o in t.trajectories])
            for t in trs
        )
        groups += (max(t.group for t in trajs) + 1) if trajs else 0
    return trajectories, turns


def round_to_arrays(
    trajectories: Sequence[Trajectory], turns: Sequence[TurnRows]
) -> dict[str, np.ndarray]:
    """A `run_groups` result as plain arrays (for `round_from_arrays` on another host).

    Kept: everything training and logging read (tokens, log-probs, prompts, images,
    rewards, texts, info made JSON-safe). Dropped: conversations and env states, which
    only the process that rolled a trajectory out needs.
    """
    meta: dict[str, Any] = {
        "trajectories": [
            {
                "task": t.task,
                "group": t.group,
                "reward": t.reward,
                "done": t.done,
                "turns": t.turns,
                "texts": t.texts,
                "rewards": t.rewards,
                "info": t.info,
            }
            for t in trajectories
        ],
        "turns": [],
    }
    out: dict[str, np.ndarray] = {}
    for i, turn in enumerate(turns):
        gen = turn.generation
        samples = [s for group in gen.samples for s in group]
        meta["turns"].append(
            {
                "owners": list(turn.trajectories),
                "group_sizes": [len(g) for g in gen.samples],
                "finish": [s.finish_reason for s in samples],
                "texts": [s.text for s in samples],
                "timings": gen.timings,
                "images": gen.image_grid_thw is not None,
            }
        )
        out[f"{i}/prompt_ids"] = gen.prompt_ids
        out[f"{i}/prompt_mask"] = gen.prompt_mask
        out[f"{i}/prompt_positions"] = gen.prompt_positions
        out[f"{i}/rope_deltas"] = gen.rope_deltas
        out[f"{i}/lengths"] = np.array([s.length for s in samples], np.int64)
        out[f"{i}/tokens"] = np.concatenate([s.tokens for s in samples]).astype(np.int32)
        out[f"{i}/logprobs"] = np.concatenate([s.logprobs for s in samples]).astype(np.float32)
        out[f"{i}/sampling_logprobs"] = np.concatenate(
            [s.sampling_logprobs for s in samples]
        ).astype(np.float32)
        if gen.image_grid_thw is not None:
            assert gen.pixel_values is not None
            out[f"{i}/pixel_values"] = gen.pixel_values
            out[f"{i}/image_grid_thw"] = gen.image_grid_thw
    blob = json.dumps(jsonable(meta, nan_to_null=False)).encode()
    out["meta"] = np.frombuffer(blob, np.uint8)
    return out


def round_from_arrays(
    arrays: Mapping[str, np.ndarray],
) -> tuple[list[Trajectory], list[TurnRows]]:
    """The inverse of `round_to_arrays` (trajectories come back without messages/state)."""
    meta = json.loads(np.asarray(arrays["meta"], np.uint8).tobytes())
    trajectories = [
        Trajectory(
            task=t["task"],
            group=t["group"],
            messages=[],
            state=None,
            reward=t["reward"],
            done=t["done"],
            turns=t["turns"],
            texts=list(t["texts"]),
            info=dict(t["info"]),
            rewards=list(t.get("rewards", [])),
        )
        for t in meta["trajectories"]
    ]
    turns = []
    for i, tm in enumerate(meta["turns"]):
        lengths = arrays[f"{i}/lengths"]
        ends = np.cumsum(lengths)
        starts = ends - lengths
        flat = [
            Sample(
                prompt_index=0,
                tokens=arrays[f"{i}/tokens"][a:b],
                logprobs=arrays[f"{i}/logprobs"][a:b],
                sampling_logprobs=arrays[f"{i}/sampling_logprobs"][a:b],
                finish_reason=finish,
                text=text,
            )
            for a, b, finish, text in zip(starts, ends, tm["finish"], tm["texts"], strict=True)
        ]
        samples: list[list[Sample]] = []
        k = 0
        for b, size in enumerate(tm["group_sizes"]):
            group = flat[k : k + size]
            for s in group:
                s.prompt_index = b
            samples.append(group)
            k += size
        gen = Generation(
            samples=samples,
            prompt_ids=arrays[f"{i}/prompt_ids"],
            prompt_mask=arrays[f"{i}/prompt_mask"],
            prompt_positions=arrays[f"{i}/prompt_positions"],
            rope_deltas=arrays[f"{i}/rope_deltas"],
            timings=dict(tm["timings"]),
            pixel_values=arrays[f"{i}/pixel_values"] if tm["images"] else None,
            image_grid_thw=arrays[f"{i}/image_grid_thw"] if tm["images"] else None,
        )
        turns.append(TurnRows(generation=gen, trajectories=list(tm["owners"])))
    return trajectories, turns


def gather_round(
    trajectories: Sequence[Trajectory], turns: Sequence[TurnRows]
) -> tuple[list[Trajectory], list[TurnRows]]:
    """Every process's share of a round, merged in process order (identical everywhere).

    Each process passes the `run_groups` result of its contiguous share of the round's
    tasks; all get back the whole round, as `merge_rounds` of the shares. With one process
    it is the identity.
    """
    from vlmgym_train.distributed import allgather_arrays

    if jax.process_count() == 1:
        return list(trajectories), list(turns)
    shares = allgather_arrays(round_to_arrays(trajectories, turns))
    return merge_rounds([round_from_arrays(share) for share in shares])
