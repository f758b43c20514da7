"""Peak memory of one compiled Qwen2.5-VL-7B training step, from abstract shapes (issue 6).

No weights exist: the train state (fp32 master params + optimizer state) and the batch are
`jax.ShapeDtypeStruct`s, the step is `vlmgym_train.trainer.train_step` jitted exactly as
`Trainer._step_fn` does (state donated), and XLA's `memory_analysis()` of the compiled
program gives argument, output, temp and alias sizes. peak ~ argument + output + temp -
alias (donated state buffers are reused for the new state).

These are the CPU backend's numbers: its buffer assignment and fusion differ from the GPU
and TPU backends', so a GPU peak may differ (usually lower temps from better fusion, plus
cuDNN/cuBLAS workspaces). Read them as the order of magnitude and as the relative effect
of the optimizer and of remat, not as a device budget.

The benchmark itself times the compile (`lower().compile()`); the memory figures (GiB) are
in `extra_info`. Configuration: the published 7B config, params fp32, compute bf16,
`ppo_clip` loss, vision trained, one 448x448 image per prompt. Batch size via env vars:
  VLMGYM_BENCH_7B_GROUPS=8 VLMGYM_BENCH_7B_GROUP_SIZE=8 VLMGYM_BENCH_7B_PROMPT=512
  VLMGYM_BENCH_7B_NEW_TOKENS=256 VLMGYM_BENCH_7B_IMAGE_GRID=32 (patches per side)
Run: uv run pytest benchmarks/test_bench_memory_7b.py -q --benchmark-columns=median -s
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from vlmgym_model import (
    CompletionInputs,
    CompletionStatics,
    Qwen2_5_VLConfig,
    abstract_params,
    param_specs,
)
from vlmgym_model.qwen2_5_vl.vision import vision_layout
from vlmgym_train.checkpointing import TrainState
from vlmgym_train.losses import LossConfig
from vlmgym_train.optim import OptimConfig, make_optimizer
from vlmgym_train.trainer import LossArrays, train_step

CONFIG = Path(__file__).parents[1] / "tests/fixtures/configs/qwen2_5_vl_7b.json"
GROUPS = int(os.environ.get("VLMGYM_BENCH_7B_GROUPS", 8))
GROUP_SIZE = int(os.environ.get("VLMGYM_BENCH_7B_GROUP_SIZE", 8))
PROMPT = int(os.environ.get("VLMGYM_BENCH_7B_PROMPT", 512))
NEW = int(os.environ.get("VLMGYM_BENCH_7B_NEW_TOKENS", 256))
GRID = int(os.environ.get("VLMGYM_BENCH_7B_IMAGE_GRID", 32))  # 32 x 32 patches = 448 px
GIB = 2**30


def _sds(x: np.ndarray) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def _abstract_batch(config: Qwen2_5_VLConfig) -> tuple[CompletionInputs, LossArrays, dict]:
    """The shapes `build_batch` + `to_policy_inputs` produce for GROUPS x GROUP_SIZE rows."""
    R, S = GROUPS * GROUP_SIZE, PROMPT + NEW
    grids = np.tile([1, GRID, GRID], (GROUPS, 1))  # one image per prompt (group)
    layout = vision_layout(grids, config.vision)
    arrays = {
        "patch_order": layout.patch_order,
        "unit_inverse": layout.unit_inverse,
        "positions": layout.positions,
        "window_segments": layout.window_segments,
        "image_segments": layout.image_segments,
    }
    K = R * GRID * GRID // config.vision.merge_unit  # image placeholders over all rows
    i32 = jnp.int32
    inputs = CompletionInputs(
        input_ids=jax.ShapeDtypeStruct((R, S), i32),
        segment_ids=jax.ShapeDtypeStruct((R, S), i32),
        positions=jax.ShapeDtypeStruct((3, R, S), i32),
        targets=jax.ShapeDtypeStruct((R, NEW), i32),
        image_rows=jax.ShapeDtypeStruct((K,), i32),
        image_cols=jax.ShapeDtypeStruct((K,), i32),
        image_feature_index=jax.ShapeDtypeStruct((K,), i32),
        pixel_values=jax.ShapeDtypeStruct(
            (layout.num_patches, config.vision.patch_dim), jnp.float32
        ),
        layout={k: _sds(np.asarray(v)) for k, v in arrays.items()},
    )
    f32 = jnp.float32
    loss_arrays = LossArrays(
        old_logp=jax.ShapeDtypeStruct((R, NEW), f32),
        mask=jax.ShapeDtypeStruct((R, NEW), f32),
        advantages=jax.ShapeDtypeStruct((R,), f32),
        ref_logp=None,
    )
    bounds = {"max_window_len": layout.max_window_len, "max_image_len": layout.max_image_len}
    return inputs, loss_arrays, bounds


@pytest.mark.parametrize("remat", [False, True], ids=["no_remat", "remat"])
@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_bench_memory_7b(benchmark, optimizer, remat):
    config = Qwen2_5_VLConfig.from_file(CONFIG)
    tx = make_optimizer(OptimConfig(optimizer=optimizer, lr=1e-6, max_grad_norm=1.0))
    params = abstract_params(param_specs(config), jnp.float32)  # fp32 master weights
    state = jax.eval_shape(lambda p: TrainState.create(p, tx, jax.random.key(0)), params)
    inputs, arrays, bounds = _abstract_batch(config)
    statics = CompletionStatics(prompt_len=PROMPT, remat=remat, **bounds)
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
        return step.lower(state, inputs, arrays).compile()

    benchmark.group = (
        f"7B train step compile, {GROUPS}x{GROUP_SIZE} rows, {PROMPT}+{NEW} tokens (CPU backend)"
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
