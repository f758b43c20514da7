"""Peak memory of one compiled training step of Qwen2.5-VL-7B, Qwen3-VL-8B and Qwen3-VL-4B,
from abstract shapes (issue 6; the Qwen3-VL rows from issue 15).

No weights exist: the train state (fp32 master params + optimizer state) and the batch are
`jax.ShapeDtypeStruct`s, the step is `vlmgym_train.grpo.train_step` jitted exactly as
the `Trainer` does (state donated), and XLA's `memory_analysis()` of the compiled
program gives argument, output, temp and alias sizes. peak ~ argument + output + temp -
alias (donated state buffers are reused for the new state).

These are the CPU backend's numbers: its buffer assignment and fusion differ from the GPU
and TPU backends', so a GPU peak may differ (usually lower temps from better fusion, plus
cuDNN/cuBLAS workspaces). Read them as the order of magnitude and as the relative effect
of the optimizer and of remat, not as a device budget.

The benchmark itself times the compile (`lower().compile()`); the memory figures (GiB) are
in `extra_info`. Configuration: the published configs, params fp32, compute bf16,
`ppo_clip` loss, vision trained, one image of 32 x 32 patches per prompt (448 px for
Qwen2.5-VL, 512 px for Qwen3-VL). Batch size via env vars:
  VLMGYM_BENCH_7B_GROUPS=8 VLMGYM_BENCH_7B_GROUP_SIZE=8 VLMGYM_BENCH_7B_PROMPT=512
  VLMGYM_BENCH_7B_NEW_TOKENS=256 VLMGYM_BENCH_7B_IMAGE_GRID=32 (patches per side)
Run: uv run pytest benchmarks/test_bench_memory_7b.py -q --benchmark-columns=median -s
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from vlmgym_model import (
    CompletionInputs,
    CompletionStatics,
    ModelInputs,
    Qwen2_5_VLConfig,
    abstract_params,
    image_inputs,
    param_specs,
)
from vlmgym_train.batch import Batch
from vlmgym_train.checkpointing import TrainState
from vlmgym_train.grpo import train_step
from vlmgym_train.losses import LossConfig
from vlmgym_train.optim import OptimConfig, make_optimizer

CONFIGS = Path(__file__).parents[1] / "tests/fixtures/configs"
MODELS = ("qwen2_5_vl_7b", "qwen3_vl_8b", "qwen3_vl_4b")
GROUPS = int(os.environ.get("VLMGYM_BENCH_7B_GROUPS", 8))
GROUP_SIZE = int(os.environ.get("VLMGYM_BENCH_7B_GROUP_SIZE", 8))
PROMPT = int(os.environ.get("VLMGYM_BENCH_7B_PROMPT", 512))
NEW = int(os.environ.get("VLMGYM_BENCH_7B_NEW_TOKENS", 256))
GRID = int(os.environ.get("VLMGYM_BENCH_7B_IMAGE_GRID", 32))  # 32 x 32 patches = 448 px
GIB = 2**30


def _abstract_batch(config: Qwen2_5_VLConfig) -> Batch:
    """The shapes `build_batch` produces for GROUPS x GROUP_SIZE rows: one prompt of
    PROMPT tokens per group (its samples share it), one image per prompt."""
    R, P = GROUPS * GROUP_SIZE, GROUPS
    grids = np.tile([1, GRID, GRID], (P, 1))
    per_prompt = GRID * GRID // config.vision.merge_unit  # image placeholders per prompt
    rows = np.repeat(np.arange(P), per_prompt)
    cols = np.tile(np.arange(per_prompt), P)
    pixels = np.zeros((P * GRID * GRID, config.vision.patch_dim), np.float32)
    images = image_inputs(config, pixels, grids, rows, cols)
    i32, f32 = jnp.int32, jnp.float32

    def sds(shape: tuple[int, ...], dtype: Any = i32) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype)

    inputs = CompletionInputs(
        prompts=ModelInputs(
            ids=sds((P, PROMPT)),
            segment_ids=sds((P, PROMPT)),
            positions=sds((3, P, PROMPT)),
            images=jax.tree.map(lambda x: sds(np.shape(x), np.asarray(x).dtype), images),
        ),
        targets=sds((R, NEW)),
        segment_ids=sds((R, NEW)),
        positions=sds((3, R, NEW)),
        row_prompt=sds((R,)),
    )
    return Batch(
        inputs=inputs,
        mask=sds((R, NEW), f32),
        old_logp=sds((R, NEW), f32),
        advantages=sds((R,), f32),
        trajectory=sds((R,)),
        truncated=sds((R,), jnp.bool_),
    )


@pytest.mark.parametrize("remat", [False, True], ids=["no_remat", "remat"])
@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
@pytest.mark.parametrize("model", MODELS)
def test_bench_memory_7b(benchmark, model, optimizer, remat):
    config = Qwen2_5_VLConfig.from_file(CONFIGS / f"{model}.json")
    tx = make_optimizer(OptimConfig(optimizer=optimizer, lr=1e-6, max_grad_norm=1.0))
    params = abstract_params(param_specs(config), jnp.float32)  # fp32 master weights
    state = jax.eval_shape(lambda p: TrainState.create(p, tx), params)
    batch = _abstract_batch(config)
    statics = CompletionStatics(remat=remat)
    step = jax.jit(
        functools.partial(
            train_step,
            tx=tx,
            config=config,
            statics=statics,
            loss_name="ppo_clip",
            loss_cfg=LossConfig(clip_low=0.2, clip_high=0.28, max_tokens=NEW),
            compute_dtype=jnp.bfloat16,
        ),
        donate_argnums=(0,),
    )

    def compile_step():
        return step.lower(state, batch).compile()

    benchmark.group = (
        f"{model} train step compile, {GROUPS}x{GROUP_SIZE} rows, {PROMPT}+{NEW} tokens (CPU)"
    )
    compiled = benchmark.pedantic(compile_step, rounds=1, warmup_rounds=0)
    mem = compiled.memory_analysis()
    sizes = {
        "argument": mem.argument_size_in_bytes,
        "output": mem.output_size_in_bytes,
        "temp": mem.temp_size_in_bytes,
        "alias": mem.alias_size_in_bytes,
    }
    n_params = sum(x.size for x in jax.tree.leaves(params))
    opt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.opt_state))
    info = {f"{k}_gib": v / GIB for k, v in sizes.items()}
    info.update(
        peak_gib=(sizes["argument"] + sizes["output"] + sizes["temp"] - sizes["alias"]) / GIB,
        xla_peak_gib=getattr(mem, "peak_memory_in_bytes", 0) / GIB,
        params_b=n_params / 1e9,
        params_fp32_gib=4 * n_params / GIB,
        opt_state_gib=opt_bytes / GIB,
        model=model,
        optimizer=optimizer,
        remat=remat,
        rows=GROUPS * GROUP_SIZE,
        tokens_per_row=PROMPT + NEW,
        backend=jax.default_backend(),
    )
    benchmark.extra_info.update(info)
    print(json.dumps(info, indent=1, default=str))
    assert sizes["argument"] >= 4 * n_params + opt_bytes  # the whole state is an argument
    assert sizes["alias"] > 0  # the donated state is updated in place
