"""A GRPO step on the real 0.5B checkpoint: the update's FLOP/s against a bare matmul.

The model is the real-weights test checkpoint (Qwen2.5-Coder-0.5B-Instruct's text decoder in
a Qwen2.5-VL checkpoint, `tests/fixtures/real_model.py`; fetched and built once). The work is
the issue's: 4 prompts x 4 samples x 32 new tokens, text only, AdamW, fp32 params, one
update per step; compute dtype from VLMGYM_BENCH_DTYPE (float32 by default, or bfloat16:
bf16 matmuls with fp32 accumulation, fp32 master weights).

Reported per timed step (medians over VLMGYM_BENCH_GRPO_STEPS, default 2, after one
warm-up step that compiles):

- rollout_s (sampling + rewards + batch building) and update_s (`grpo.update`: host to
  device, one value-and-grad, the optimizer; no reference pass at kl_coef = 0, and the
  sampler's log-probs are the behaviour policy, so nothing is recomputed for them);
- update_flops: what the update computes, counted from the batch's shapes. The prompt of a
  group is run once for its samples (P prompts x T tokens, plus R completions x N tokens);
  a row-per-sample trainer (TRL, verl) computes R x (T + N) tokens instead, reported as
  `row_layout_flops`. Per token and layer, a weight matmul costs 2 x params forward and
  4 x params backward; attention 4 x keys x width forward (causal: the keys each query
  sees), twice that backward; the lm_head runs on completion tokens only, 8 x D x V each
  (forward, a recompute in the backward pass, and two backward matmuls);
- forward_s: a forward-only log-prob pass over the same batch (what a reference-policy
  pass costs when kl_coef > 0; the update itself runs it inside its value-and-grad), so
  update_s - forward_s is the backward pass plus the optimizer;
- matmul_flops_per_s: a bare [P*T + R*N, D] x [D, F] matmul (the MLP's shape) in the same
  dtype, timed in the same run (the best of 20); `update_vs_matmul` is the update's FLOP/s
  over it;
- allocator: the malloc in use. XLA's CPU runtime allocates a step's temporaries afresh
  each call; glibc's malloc, at its defaults, hands them back to the OS and page-faults them
  in again every step. This module tunes glibc on import ("glibc (tuned)"), as
  `vlmgym-train` does for a checkpoint this large before its first JAX computation
  (`vlmgym_model.host_malloc`); VLMGYM_TUNE_MALLOC=0 measures glibc's defaults, and
  LD_PRELOAD=.../libtcmalloc_minimal.so.4 measures tcmalloc.

Run: uv run pytest benchmarks/test_bench_grpo_step.py -q -s
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import vlmgym_envs
from vlmgym_envs import Env, Observation, StepResult, user_message
from vlmgym_model import compute_logprobs
from vlmgym_model.host_malloc import malloc_in_use, tune_glibc_malloc
from vlmgym_train.batch import Batch, place_batch
from vlmgym_train.config import TrainConfig
from vlmgym_train.grpo import collect_groups, score_groups, update
from vlmgym_train.optim import cast_for_compute
from vlmgym_train.trainer import Trainer

# Before the first JAX computation, as the CLI does (the arena limit binds only threads that
# have not allocated yet).
tune_glibc_malloc()  # does nothing with VLMGYM_TUNE_MALLOC=0 or a preloaded malloc

STEPS = int(os.environ.get("VLMGYM_BENCH_GRPO_STEPS", 2))
DTYPE = os.environ.get("VLMGYM_BENCH_DTYPE", "float32")
GROUPS, GROUP_SIZE, NEW_TOKENS = 4, 4, 32

QUESTIONS = (
    "What is a hash map?",
    "Why do programs need tests?",
    "What does a compiler do?",
    "What is recursion?",
    "What is a race condition?",
    "Why is Python popular?",
    "What is a pure function?",
    "What is version control for?",
)


class WordCountEnv(Env[int]):
    """Answer in exactly N words; reward 1 - |words - N| / max(N, words)."""

    def __len__(self) -> int:
        return len(QUESTIONS) * 4

    def reset(self, idx: int) -> tuple[int, Observation]:
        idx = self.check_index(idx)
        n = 3 + idx % 4
        question = QUESTIONS[idx // 4]
        return n, Observation([user_message(f"{question} Answer in exactly {n} words.")])

    def step(self, state: int, text: str) -> StepResult[int]:
        words = len(text.split())
        return StepResult(reward=1.0 - abs(words - state) / max(state, words, 1), done=True)


def update_flops(config: Any, P: int, T: int, R: int, N: int, row_layout: bool) -> float:
    """FLOPs of one value-and-grad over P prompts of T tokens continued by R completions of
    N tokens (`row_layout`: every row recomputes its prompt, R x (T + N) tokens)."""
    t = config.text
    D, F, V, L = t.hidden_size, t.intermediate_size, t.vocab_size, t.num_hidden_layers
    kv = t.num_key_value_heads * t.head_dim
    layer_params = D * D * 2 + D * kv * 2 + 3 * D * F
    if row_layout:
        tokens = R * (T + N)
        keys = R * ((T + N) * (T + N + 1) / 2)  # sum over queries of the keys each sees
    else:
        tokens = P * T + R * N
        keys = P * T * (T + 1) / 2 + R * (N * T + N * (N + 1) / 2)
    forward = L * (2 * layer_params * tokens + 4 * keys * D)
    return 3 * forward + 8 * D * V * R * N


def bare_matmul_flops_per_s(M: int, D: int, F: int, dtype: Any, reps: int = 20) -> float:
    """The best of `reps` timings of a jitted [M, D] x [D, F] matmul: what this CPU's matmul
    attains at that shape when nothing interferes (a median moves with the machine's noise;
    the best makes the update's ratio to it a lower bound)."""
    a = jnp.ones((M, D), dtype)
    b = jnp.ones((D, F), dtype)
    mm = jax.jit(lambda a, b: jnp.einsum("MD,DF->MF", a, b, preferred_element_type=jnp.float32))
    mm(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        mm(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * M * D * F / min(times)


def forward_seconds(trainer: Trainer, batch: Batch) -> float:
    """Wall time of a forward-only log-prob pass over a batch (compiled first, not timed)."""
    statics = trainer.statics
    params = cast_for_compute(trainer.state.params, trainer.compute_dtype)
    placed = place_batch(batch, trainer._place).inputs

    def run() -> None:
        jax.block_until_ready(
            compute_logprobs(params, placed, config=trainer.config, statics=statics)
        )

    run()
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def real_model_dir() -> str:
    from fixtures.real_model import real_model_dirs

    return str(real_model_dirs().model_dir)


def make_trainer(model_dir: str, save_dir: str, dtype: str) -> Trainer:
    """The benchmark's trainer: GROUPS x GROUP_SIZE samples of NEW_TOKENS on WordCountEnv."""
    vlmgym_envs.register("bench-wordcount", WordCountEnv, overwrite=True)
    return Trainer(
        TrainConfig.flat(
            model_dir=model_dir,
            env_name="bench-wordcount",
            groups_per_batch=GROUPS,
            group_size=GROUP_SIZE,
            num_generation_tokens=NEW_TOKENS,
            lr=1e-6,
            compute_dtype=dtype,
            save_dir=save_dir,
            save_interval=10_000,
            progress=False,
        )
    )


def timed_step(trainer: Trainer, i: int) -> tuple[dict[str, float], Batch]:
    """Step i (rollouts, then the update), timed; returns (record, the step's batch)."""
    setup = trainer.setup
    t0 = time.perf_counter()
    rollouts = collect_groups(setup, trainer.rollout_params(), i)
    batch, *_ = score_groups(setup, rollouts)
    t1 = time.perf_counter()
    trainer.state, updates = update(setup, trainer.state, batch, i)
    t2 = time.perf_counter()
    P, T = batch.inputs.prompts.ids.shape
    R, N = batch.inputs.targets.shape
    record = {
        "rollout_s": t1 - t0,
        "sample_s": rollouts.stats.get("time/sample_s", float("nan")),
        "update_s": t2 - t1,
        "step_s": t2 - t0,
        "tokens": float(batch.mask.sum()),
        "loss": float(updates[0]["loss"]),
        "skipped": float(updates[0]["skipped"]),
        "P": P,
        "T": T,
        "R": R,
        "N": N,
    }
    return record, batch


def test_bench_grpo_step_real_05b(benchmark, tmp_path, real_model_dir):
    trainer = make_trainer(real_model_dir, str(tmp_path / "run"), DTYPE)
    records: list[dict[str, float]] = []
    step = iter(range(1 + STEPS))

    def one_step() -> None:
        i = next(step)
        record, batch = timed_step(trainer, i)
        record["forward_s"] = forward_seconds(trainer, batch) if i else 0.0
        records.append(record)

    one_step()  # warm-up: compiles the sampler and the update
    benchmark.group = "GRPO step, real 0.5B"
    benchmark.pedantic(one_step, rounds=STEPS, warmup_rounds=0)
    timed = records[1:]
    assert all(np.isfinite(r["loss"]) and r["skipped"] == 0 for r in records)
    P, T, R, N = (int(timed[-1][k]) for k in "PTRN")
    flops = update_flops(trainer.config, P, T, R, N, row_layout=False)
    row_flops = update_flops(trainer.config, P, T, R, N, row_layout=True)
    update_s = statistics.median(r["update_s"] for r in timed)
    forward_s = statistics.median(r["forward_s"] for r in timed)
    rollout_s = statistics.median(r["rollout_s"] for r in timed)
    t = trainer.config.text
    compute = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[DTYPE]
    mm = bare_matmul_flops_per_s(P * T + R * N, t.hidden_size, t.intermediate_size, compute)
    info = {
        "dtype": DTYPE,
        "allocator": malloc_in_use(),
        "prompts_x_T": f"{P} x {T}",
        "rows_x_N": f"{R} x {N}",
        "rollout_s": rollout_s,
        "update_s": update_s,
        "forward_s": forward_s,
        "step_s": rollout_s + update_s,
        "update_flops": flops,
        "row_layout_flops": row_flops,
        "update_flops_per_s": flops / update_s,
        "matmul_flops_per_s": mm,
        "update_vs_matmul": flops / update_s / mm,
        "steps_timed": len(timed),
        "steps": [
            {k: round(float(r[k]), 3) for k in ("rollout_s", "update_s", "forward_s", "tokens")}
            for r in records
        ],
    }
    benchmark.extra_info.update(info)
    print(json.dumps(info, indent=1, default=float))
