"""One GRPO update at the 3B shape: step time, MFU, and peak memory three ways.

The update is `vlmgym_train.grpo.train_step` jitted as the `Trainer` jits it (state
donated): bf16 compute over fp32 master params, the "ppo_clip" loss, AdamW with gradient
clipping. The batch is random and concrete: R rows, each its own prompt of T tokens
followed by N completion tokens, text only, its gradient accumulated over micro-batches
of `micro_rows` rows (`vlmgym_train.microbatch`). The first call after the compile is a
warm-up; the median of the next few is the step time.

MFU = 6 x n_text_params x tokens / step_s / peak bf16 FLOP/s, tokens = R x (T + N). The
6N rule counts each weight's matmul once forward (2N) and twice backward (4N) per token.
It leaves out the attention products (4 x keys x width per token and layer forward, small
at T + N = 384 against 2 x 77M per layer), the optimizer and the elementwise work; and it
overcounts the output projection, which runs on completion tokens only: with tied
embeddings it is 10% of the 3B text params, applied to a third of the tokens, so the
figure is about 7% high on that account.

Memory, side by side:
* measured: `peak_bytes_in_use` of the device's allocator after the steps. JAX cannot
  reset it, so it is the process's peak; the earlier sections need far less than this
  step, and `measured_peak_set_here` says whether the peak rose during this section;
* compiled: XLA's `memory_analysis()` of the same compiled step, argument + output +
  temp - alias (the donated state is updated in place);
* plan: what `vlmgym-train --plan` predicts for the step (`plan_figure`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from device import memory_stats
from model_shapes import count_params, model_config, random_params
from vlmgym_model import CompletionInputs, CompletionStatics, ModelInputs, Qwen2_5_VLConfig
from vlmgym_train.batch import Batch
from vlmgym_train.checkpointing import TrainState
from vlmgym_train.grpo import train_step
from vlmgym_train.losses import LossConfig
from vlmgym_train.microbatch import MicroBatches, PolicyView, split_micro
from vlmgym_train.optim import OptimConfig, make_optimizer


@dataclasses.dataclass(frozen=True)
class StepShape:
    model: str  # a `model_shapes.TEXT_SHAPES` key
    rows: int  # R, each with its own prompt
    prompt_len: int  # T
    new_tokens: int  # N
    timed_steps: int
    micro_rows: int | None = None  # rows per micro-batch (None: all rows in one pass)


SHAPES = {
    # XLA's CPU memory analysis of this step: 143 GiB in one 16-row pass, more than an H200
    # holds; 113 GiB in 8-row micro-batches, 91 GiB in 4-row ones.
    "gpu": StepShape(
        model="3b", rows=16, prompt_len=256, new_tokens=128, timed_steps=3, micro_rows=4
    ),
    "smoke": StepShape(
        model="smoke", rows=4, prompt_len=32, new_tokens=16, timed_steps=1, micro_rows=2
    ),
}


def update_program(
    config: Qwen2_5_VLConfig, tx: Any, impl: str, new_tokens: int
) -> Callable[..., Any]:
    """`train_step` with every keyword bound, state donated, as the `Trainer` jits it: the
    one place the step's signature is spelled out. Call it as (state, micro-batches)."""
    return jax.jit(
        functools.partial(
            train_step,
            tx=tx,
            config=config,
            statics=CompletionStatics(impl=impl),
            loss_name="ppo_clip",
            loss_cfg=LossConfig(clip_low=0.2, clip_high=0.28, max_tokens=new_tokens),
            view=PolicyView(compute_dtype=jnp.bfloat16),
        ),
        donate_argnums=(0,),
    )


def random_batch(config: Qwen2_5_VLConfig, s: StepShape, seed: int = 0) -> Batch:
    """R rows of random tokens: prompt row r continues into completion row r."""
    rng = np.random.default_rng(seed)
    R, T, N = s.rows, s.prompt_len, s.new_tokens
    V = config.text.vocab_size - 4  # below the special ids

    def positions(start: int, length: int) -> np.ndarray:
        return np.ascontiguousarray(
            np.broadcast_to(start + np.arange(length, dtype=np.int32), (3, R, length))
        )  # [3, R, length]

    inputs = CompletionInputs(
        prompts=ModelInputs(
            ids=rng.integers(0, V, (R, T)).astype(np.int32),  # [R, T]
            segment_ids=np.ones((R, T), np.int32),
            positions=positions(0, T),
        ),
        targets=rng.integers(0, V, (R, N)).astype(np.int32),  # [R, N]
        segment_ids=np.ones((R, N), np.int32),
        positions=positions(T, N),
        row_prompt=np.arange(R, dtype=np.int32),
    )
    return Batch(
        inputs=inputs,
        mask=np.ones((R, N), np.float32),
        old_logp=np.full((R, N), -np.log(config.text.vocab_size), np.float32),  # ~ uniform
        advantages=rng.standard_normal(R).astype(np.float32),
        trajectory=np.arange(R, dtype=np.int32),
        truncated=np.zeros(R, bool),
    )


def compiled_memory(compiled: Any) -> dict[str, int] | None:
    """XLA's buffer sizes for a compiled program, and argument + output + temp - alias."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    sizes = {
        "argument": int(mem.argument_size_in_bytes),
        "output": int(mem.output_size_in_bytes),
        "temp": int(mem.temp_size_in_bytes),
        "alias": int(mem.alias_size_in_bytes),
    }
    sizes["peak"] = sizes["argument"] + sizes["output"] + sizes["temp"] - sizes["alias"]
    return sizes


def plan_figure(plan_path: str | Path | None) -> int | None:
    """The `vlmgym-train --plan` prediction for this step: `peak_bytes_per_device` from
    the plan.json at `plan_path` when that file is present, else None."""
    if plan_path is None or not Path(plan_path).is_file():
        return None
    return int(json.loads(Path(plan_path).read_text())["peak_bytes_per_device"])


def _run_steps(compiled: Any, state: Any, batch: MicroBatches, steps: int) -> tuple[Any, Any, list]:
    """A warm-up call, then `steps` timed ones; (state, last metrics, seconds per step)."""
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return state, jax.device_get(metrics), times


def grpo_section(
    smoke: bool,
    seconds_left: Callable[[], float],
    peak_flops: float | None,
    impl: str,
    plan_path: str | None = None,
) -> dict[str, Any]:
    del seconds_left  # one indivisible measurement
    s = SHAPES["smoke" if smoke else "gpu"]
    config = model_config(s.model)
    tx = make_optimizer(OptimConfig(optimizer="adamw", lr=1e-6, max_grad_norm=1.0))
    params = random_params(config, jnp.float32)  # fp32 master weights
    state = jax.jit(lambda p: TrainState.create(p, tx), donate_argnums=(0,))(params)
    n_text = count_params(state.params.text)
    batch = jax.device_put(split_micro(random_batch(config, s), s.micro_rows))
    mem_before = memory_stats()
    start = time.perf_counter()
    compiled = update_program(config, tx, impl, s.new_tokens).lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    state, metrics, times = _run_steps(compiled, state, batch, s.timed_steps)
    mem_after = memory_stats()
    step_s = statistics.median(times)
    tokens = s.rows * (s.prompt_len + s.new_tokens)
    flops = 6.0 * n_text * tokens
    measured = None if mem_after is None else mem_after.get("peak_bytes_in_use")
    return {
        "shape": dataclasses.asdict(s),
        "impl": impl,
        "text_params": n_text,
        "tokens": tokens,
        "compile_s": compile_s,
        "step_s": step_s,
        "step_s_all": times,
        "model_tflops_per_s": flops / step_s / 1e12,
        "mfu": None if peak_flops is None else flops / step_s / peak_flops,
        "loss": float(metrics["loss"]),
        "skipped_updates": float(metrics["skipped"]),
        "memory": {
            "measured_peak_bytes": measured,
            "measured_peak_set_here": None
            if mem_before is None or measured is None
            else measured > mem_before.get("peak_bytes_in_use", 0),
            "bytes_in_use_before_step": None
            if mem_before is None
            else mem_before.get("bytes_in_use"),
            "bytes_in_use_after_steps": None
            if mem_after is None
            else mem_after.get("bytes_in_use"),
            "compiled": compiled_memory(compiled),
            "plan_peak_bytes": plan_figure(plan_path),
        },
    }
