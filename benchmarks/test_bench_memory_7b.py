"""Peak memory of one compiled training step of Qwen2.5-VL-7B, Qwen3-VL-8B and Qwen3-VL-4B,
from abstract shapes (issue 6; the Qwen3-VL rows from issue 15).

No weights exist: the step is compiled on abstract shapes by `vlmgym_train.plan` (what
`vlmgym-train --plan` runs), `vlmgym_train.grpo.train_step` jitted exactly as the
`Trainer` does (state donated), and XLA's `memory_analysis()` of the compiled program gives
argument, output, temp and alias sizes. peak ~ argument + output + temp - alias (donated
state buffers are reused for the new state). One micro-batch (the whole batch), fp32
master params: the figures of the first wave, before micro-batches; see
benchmarks/plan_targets.py for the configurations that fit a GPU.

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

import json
import os
from pathlib import Path

import jax
import pytest
from vlmgym_model import Qwen2_5_VLConfig
from vlmgym_train.config import TrainConfig
from vlmgym_train.plan import _Planner, per_device_bytes

CONFIGS = Path(__file__).parents[1] / "tests/fixtures/configs"
MODELS = ("qwen2_5_vl_7b", "qwen3_vl_8b", "qwen3_vl_4b")
GROUPS = int(os.environ.get("VLMGYM_BENCH_7B_GROUPS", 8))
GROUP_SIZE = int(os.environ.get("VLMGYM_BENCH_7B_GROUP_SIZE", 8))
PROMPT = int(os.environ.get("VLMGYM_BENCH_7B_PROMPT", 512))
NEW = int(os.environ.get("VLMGYM_BENCH_7B_NEW_TOKENS", 256))
GRID = int(os.environ.get("VLMGYM_BENCH_7B_IMAGE_GRID", 32))  # 32 x 32 patches = 448 px
GIB = 2**30


@pytest.mark.parametrize("remat", [False, True], ids=["no_remat", "remat"])
@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
@pytest.mark.parametrize("model", MODELS)
def test_bench_memory_7b(benchmark, model, optimizer, remat):
    config = Qwen2_5_VLConfig.from_file(CONFIGS / f"{model}.json")
    cfg = TrainConfig.flat(
        model_dir=str(CONFIGS), groups_per_batch=GROUPS, group_size=GROUP_SIZE,
        num_generation_tokens=NEW, optimizer=optimizer, remat=remat, lr=1e-6,
        clip_high=0.28, compute_dtype="bfloat16", param_dtype="float32", mesh_fsdp=1,
    )  # fmt: skip
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"))
    planner = _Planner(cfg, config, mesh)
    image = GRID * config.vision.patch_size
    micro = planner.micro(PROMPT, image)

    benchmark.group = (
        f"{model} train step compile, {GROUPS}x{GROUP_SIZE} rows, {PROMPT}+{NEW} tokens (CPU)"
    )
    mem = benchmark.pedantic(lambda: planner.train_step(micro), rounds=1, warmup_rounds=0)
    sizes = {"argument": mem.argument, "output": mem.output, "temp": mem.temp, "alias": mem.alias}
    n_params = sum(x.size for x in jax.tree.leaves(planner.params))
    opt_bytes = per_device_bytes(planner.state.opt_state)
    info = {f"{k}_gib": v / GIB for k, v in sizes.items()}
    info.update(
        peak_gib=mem.peak / GIB,
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
