"""Training step time, split into rollout / log-prob / update, and samples per second (issue 6).

Two sizes, both on the `shapes` env:

* tiny: `TrainConfig()` defaults (the tiny preset, 8 groups x 16 samples, 2 new tokens).
* 0.5B-sized: Qwen2.5-0.5B's text shape (24 layers, width 896, 14/2 heads) with a 4-block
  Qwen2.5-VL vision tower, random weights, written by `vlmgym_model.tiny.write_tiny_model`
  with the env's word-level tokenizer: the vocabulary is the env's words (a few hundred),
  not 151,936, so the embedding and output projection are far smaller than the real
  model's. Smaller batch: VLMGYM_BENCH_TRAIN_GROUPS x VLMGYM_BENCH_TRAIN_GROUP_SIZE
  (default 2 x 4) rows, VLMGYM_BENCH_TRAIN_NEW_TOKENS (default 16) new tokens,
  VLMGYM_BENCH_TRAIN_IMAGE px images (default 224: 64 image tokens).

Each timed step is `grpo.collect_groups` + `grpo.score_groups` (rollout: sampling,
detokenising, rewards, batch building; `time/sample_s` is the sampling part) then
`grpo.update` (one jitted value-and-grad + AdamW update, which recomputes the policy
log-probs inside it). The "log-prob" column is a separate forward-only `compute_logprobs`
over the same batch: what a reference-policy (kl_coef > 0) or old-policy pass costs; the
default step (kl_coef = 0) does not run it. The first step (compiles) is the warm-up;
VLMGYM_BENCH_TRAIN_STEPS (default 2) steps are timed after it.

Run: uv run pytest benchmarks/test_bench_train_step.py -q --benchmark-columns=median -s
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import time

import jax
import pytest
from vlmgym_model import compute_logprobs
from vlmgym_train.batch import Batch, place_batch
from vlmgym_train.config import TrainConfig
from vlmgym_train.grpo import collect_groups, score_groups, update
from vlmgym_train.optim import cast_for_compute
from vlmgym_train.trainer import Trainer

STEPS = int(os.environ.get("VLMGYM_BENCH_TRAIN_STEPS", 2))
GROUPS = int(os.environ.get("VLMGYM_BENCH_TRAIN_GROUPS", 2))
GROUP_SIZE = int(os.environ.get("VLMGYM_BENCH_TRAIN_GROUP_SIZE", 4))
NEW_TOKENS = int(os.environ.get("VLMGYM_BENCH_TRAIN_NEW_TOKENS", 16))
IMAGE = int(os.environ.get("VLMGYM_BENCH_TRAIN_IMAGE", 224))

QWEN05B_SIZES = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vision_depth=4,
    vision_hidden_size=1280,
    vision_heads=16,
    fullatt_block_indexes=(3,),
)


def _logprob_seconds(trainer: Trainer, batch: Batch) -> float:
    """Wall time of a forward-only log-prob pass over the step's batch (compiled already)."""
    statics = trainer.statics
    params = cast_for_compute(trainer.state.params, trainer.compute_dtype)
    inputs = place_batch(batch, trainer._place).inputs

    def run() -> None:
        jax.block_until_ready(
            compute_logprobs(params, inputs, config=trainer.config, statics=statics)
        )

    run()  # compile
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _bench(benchmark, trainer: Trainer, label: str) -> None:
    steps = itertools.count()
    records: list[dict[str, float]] = []
    setup = trainer.setup

    def one_step() -> None:
        step = next(steps)
        t0 = time.perf_counter()
        rollouts = collect_groups(setup, trainer.rollout_params(), step)
        batch, *_ = score_groups(setup, rollouts)
        t1 = time.perf_counter()
        logprob_s = _logprob_seconds(trainer, batch) if step > 0 else 0.0
        t2 = time.perf_counter()
        trainer.state, updates = update(setup, trainer.state, batch, step)
        t3 = time.perf_counter()
        records.append(
            {
                "rollout_s": t1 - t0,
                "sample_s": rollouts.stats["time/sample_s"],
                "logprob_s": logprob_s,
                "update_s": t3 - t2,
                "step_s": (t1 - t0) + (t3 - t2),
                "loss": float(updates[0]["loss"]),
            }
        )

    cfg = trainer.cfg
    rows = cfg.rollout.groups_per_batch * cfg.rollout.group_size
    first_start = time.perf_counter()
    one_step()  # warm-up: compiles the sampler, the update and the log-prob pass
    first_step_s = time.perf_counter() - first_start
    benchmark.group = f"train step, {label}"
    benchmark.pedantic(one_step, rounds=STEPS, warmup_rounds=0)
    timed = records[1:]
    med = {k: statistics.median(r[k] for r in timed) for k in timed[0]}
    info = {
        "model": label,
        "rows": rows,
        "new_tokens": trainer.max_new_tokens,
        "first_step_s": first_step_s,
        "first_step": records[0],
        **{f"median_{k}": v for k, v in med.items()},
        "samples_per_s": rows / med["step_s"],
        "steps_timed": len(timed),
    }
    benchmark.extra_info.update(info)
    print(json.dumps(info, indent=1, default=float))
    assert all(r["loss"] == r["loss"] for r in records)  # finite, not NaN


def test_bench_train_step_tiny(benchmark, tmp_path):
    trainer = Trainer(TrainConfig.flat(save_dir=str(tmp_path / "run"), progress=False))
    _bench(benchmark, trainer, "tiny preset, TrainConfig() defaults")


@pytest.fixture(scope="module")
def qwen05b_sized_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from vlmgym_envs import make as make_env
    from vlmgym_model.tiny import write_tiny_model
    from vlmgym_train.presets import environment_texts

    directory = tmp_path_factory.mktemp("qwen05b_sized")
    env = make_env("shapes", image_size=IMAGE)
    write_tiny_model(directory, environment_texts(env), seed=0, **QWEN05B_SIZES)
    return str(directory)


def test_bench_train_step_05b(benchmark, tmp_path, qwen05b_sized_dir):
    cfg = TrainConfig.flat(
        model_dir=qwen05b_sized_dir,
        env_kwargs=json.dumps({"image_size": IMAGE}),
        groups_per_batch=GROUPS,
        group_size=GROUP_SIZE,
        num_generation_tokens=NEW_TOKENS,
        save_dir=str(tmp_path / "run"),
        progress=False,
    )
    trainer = Trainer(cfg)
    n = sum(x.size for x in jax.tree.leaves(trainer.state.params))
    benchmark.extra_info["params_m"] = n / 1e6
    _bench(benchmark, trainer, f"0.5B-sized ({n / 1e6:.0f}M params, fp32), {IMAGE}px images")
