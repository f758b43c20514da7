"""`vlmgym-train --plan`: per-device memory of a run, from XLA, before any weight is read.

The training step (`grpo.train_step`, jitted as the `Trainer` jits it, state donated) and
the sampler's prefill and decode loop are compiled on abstract shapes: the model's
config.json, the mesh and batch of the usual flags, prompts of `--max_prompt_tokens`
tokens with one square image of `--plan_image_size` pixels each, completions of
`--num_generation_tokens`. XLA's `memory_analysis()` of each compiled program gives, per
device, its argument, output, temporary and aliased (donated, reused) bytes:

    program peak = argument + output + temp - alias
    update phase = train step's peak + what lives beside it (the reference params)
    rollout phase = the state (params, optimizer, base) + the reference + the sampler's
                    copy of the params when it differs (a cast) + the sampler's peak
                    without its params argument (KV cache, logits, decode-layer copies)
    peak_bytes_per_device = max(update phase, rollout phase)

These are the figures of the backend the plan runs on. The CPU backend assigns buffers
and fuses differently from the GPU backend (the GPU backend also needs cuBLAS/cuDNN
workspaces and XLA's own reserve), so a plan made on a CPU is an estimate of a GPU run's
peak; `benchmarks/gpu/run.sh` measures the two side by side. To plan a mesh bigger than
this machine's device count, `vlmgym-train --plan` simulates CPU devices.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from vlmgym_model import (
    Qwen2_5_VLConfig,
    Sampler,
    ShardingRules,
    abstract_params,
    adapter_specs,
    image_inputs,
    model_inputs,
    param_specs,
    with_adapters,
)

from vlmgym_train import distributed
from vlmgym_train.batch import Batch
from vlmgym_train.checkpointing import TrainState
from vlmgym_train.config import TrainConfig
from vlmgym_train.grpo import train_step
from vlmgym_train.microbatch import MicroBatches, PolicyView, place_micro, split_micro
from vlmgym_train.optim import make_optimizer, trainable_by_name

GIB = 2**30
# XLA's CPU backend computes bf16 slices in float32 (its bf16 normalisation wraps them in
# converts) and its loop-invariant code motion then hoists convert(weight stack) out of
# every layer loop: a float32 copy of each bf16 weight stack a loop reads (28.9 of the 33
# GiB of temporaries of the 7B LoRA step). GPU and TPU compiles make no such copy, so the
# plan compiles without that pass on the CPU (a CPU training run does pay it).
_CPU_PLAN_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def _compile(lowered: Any) -> Any:
    cpu = jax.default_backend() == "cpu"
    return lowered.compile(compiler_options=_CPU_PLAN_OPTIONS if cpu else None)


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
    """XLA's memory analysis of one compiled program, per device (bytes)."""

    argument: int
    output: int
    temp: int
    alias: int

    @classmethod
    def of(cls, compiled: Any) -> ProgramMemory:
        m = compiled.memory_analysis()
        return cls(
            int(m.argument_size_in_bytes),
            int(m.output_size_in_bytes),
            int(m.temp_size_in_bytes),
            int(m.alias_size_in_bytes),
        )

    @property
    def peak(self) -> int:
        return self.argument + self.output + self.temp - self.alias


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree of (sharded) `ShapeDtypeStruct`s or arrays."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _host_batch(config: Qwen2_5_VLConfig, prompts: int, rows: int, prompt_len: int,
                new_tokens: int, image_size: int) -> Batch:  # fmt: skip
    """A host `Batch` of the shapes `build_batch` gives: `prompts` prompts of `prompt_len`
    tokens with one image each, `rows` completions spread evenly over them."""
    from vlmgym_model import CompletionInputs, ModelInputs

    vision = config.vision
    grid = batch_grid(config, image_size)
    grids = np.tile(grid, (prompts, 1))
    side = int(grid[1])
    per_image = side * side // vision.merge_unit
    if per_image >= prompt_len:
        raise ValueError(
            f"--plan_image_size {image_size} gives {per_image} image tokens, more than "
            f"--max_prompt_tokens {prompt_len}"
        )
    pixels = np.zeros((prompts * side * side, vision.patch_dim), np.float32)
    images = image_inputs(
        config, pixels, grids,
        np.repeat(np.arange(prompts), per_image), np.tile(np.arange(per_image), prompts),
    )  # fmt: skip
    zeros = functools.partial(np.zeros, dtype=np.int32)
    inputs = CompletionInputs(
        prompts=ModelInputs(
            ids=zeros((prompts, prompt_len)),
            segment_ids=np.ones((prompts, prompt_len), np.int32),
            positions=zeros((3, prompts, prompt_len)),
            images=images,
        ),
        targets=zeros((rows, new_tokens)),
        segment_ids=np.ones((rows, new_tokens), np.int32),
        positions=zeros((3, rows, new_tokens)),
        row_prompt=(np.arange(rows) * prompts // rows).astype(np.int32),
    )
    return Batch(
        inputs=inputs,
        mask=np.ones((rows, new_tokens), np.float32),
        old_logp=np.zeros((rows, new_tokens), np.float32),
        advantages=np.zeros(rows, np.float32),
        trajectory=np.arange(rows, dtype=np.int32),
        truncated=np.zeros(rows, bool),
    )


class _Planner:
    """The abstract state, batch and programs of a run (see the module doc)."""

    def __init__(self, cfg: TrainConfig, config: Qwen2_5_VLConfig, mesh: Mesh) -> None:
        self.cfg, self.config, self.mesh = cfg, config, mesh
        self.rules = ShardingRules()
        optim = cfg.optim
        self.lora = optim.lora_config()
        self.compute_dtype = jnp.dtype(optim.compute_dtype)
        param_dtype = jnp.dtype(optim.param_dtype)
        specs = param_specs(config)
        trainable = None
        if self.lora is None:
            self.frozen = None
            self.params = abstract_params(specs, param_dtype, mesh, self.rules)
            if not optim.train_vision:
                trainable = lambda p: trainable_by_name(p, frozen=("vision",))  # noqa: E731
        else:
            self.frozen = abstract_params(specs, self.compute_dtype, mesh, self.rules)
            lora_specs = adapter_specs(specs, self.lora)
            self.params = abstract_params(lora_specs, jnp.float32, mesh, self.rules)
        total = cfg.run.total_steps * cfg.updates_per_step
        self.tx = make_optimizer(optim.optim_config(total_updates=total), trainable=trainable)
        shardings = jax.tree.map(lambda x: x.sharding, self.params)
        state_shardings = TrainState.shardings(self.tx, self.params, shardings, mesh)
        self.state = _abstract(jax.eval_shape(lambda p: TrainState.create(p, self.tx),
                                              self.params), state_shardings)  # fmt: skip

    def place(self, x: Any, batch_dim: int | None = None) -> jax.ShapeDtypeStruct:
        axes: list[str | None] = [None] * np.ndim(x)
        if batch_dim is not None:
            axes[batch_dim] = "batch"
        spec = self.rules.partition_spec(axes, np.shape(x), self.mesh)
        return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                    sharding=NamedSharding(self.mesh, spec))  # fmt: skip

    def micro(self, prompt_len: int, image_size: int) -> MicroBatches:
        rollout, algorithm = self.cfg.rollout, self.cfg.algorithm
        assert rollout.num_generation_tokens is not None
        rows = rollout.groups_per_batch * rollout.group_size // algorithm.minibatches
        prompts = min(rollout.groups_per_batch, rows)
        batch = _host_batch(self.config, prompts, rows, prompt_len,
                            rollout.num_generation_tokens, image_size)  # fmt: skip
        return place_micro(split_micro(batch, self.cfg.optim.micro_batch_size), self.place)

    def train_step(self, micro: MicroBatches) -> ProgramMemory:
        cfg = self.cfg
        assert cfg.rollout.num_generation_tokens is not None
        state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
        step = jax.jit(
            functools.partial(
                train_step,
                tx=self.tx,
                config=self.config,
                statics=cfg.optim.completion_statics(),
                loss_name=cfg.algorithm.loss,
                loss_cfg=cfg.algorithm.loss_config(max_tokens=cfg.rollout.num_generation_tokens),
                view=PolicyView(self.compute_dtype, self.lora),
                rounding=cfg.optim.update_rounding,
            ),
            donate_argnums=(0,),
            out_shardings=(state_shardings, NamedSharding(self.mesh, PartitionSpec())),
        )
        return ProgramMemory.of(_compile(step.lower(self.state, micro, self.frozen)))

    def rollout_params(self) -> Any:
        """The sampler's params: the state's (cast to the compute dtype) or base + adapters."""
        if self.lora is not None:
            cast = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, self.compute_dtype, sharding=x.sharding),
                self.params,
            )
            return with_adapters(self.frozen, cast, self.lora)
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, self.compute_dtype, sharding=x.sharding),
            self.params,
        )

    def sampler(self, prompt_len: int, image_size: int) -> ProgramMemory:
        """The larger of the prefill's and the decode loop's peaks, params excluded."""
        rollout = self.cfg.rollout
        assert rollout.num_generation_tokens is not None
        prompts = -(-rollout.groups_per_batch // rollout.rollout_chunks)
        sampler = Sampler(
            self.config,
            stop_token_ids=[0],
            impl=self.cfg.optim.attention_impl,
            decode_layout="stacked",  # an accelerator's (the CPU's copies: see Sampler)
        )
        prompts = next(b for b in (*sampler.batch_buckets, prompts) if b >= prompts)
        grid = batch_grid(self.config, image_size)
        per_image = int(grid.prod()) // self.config.vision.merge_unit
        ids = np.where(np.arange(prompt_len) < per_image, self.config.image_token_id, 1)
        ids = np.broadcast_to(ids, (prompts, prompt_len)).astype(np.int32)
        pixels = np.zeros((prompts * int(grid.prod()), self.config.vision.patch_dim), np.float32)
        inputs, _ = model_inputs(self.config, ids, None, pixels, np.tile(grid, (prompts, 1)))
        params = self.rollout_params()
        n, N = rollout.group_size, rollout.num_generation_tokens
        shaped = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), inputs
        )
        prefill = functools.partial(sampler._prefill, new_tokens=N, num_samples=n)
        pre = ProgramMemory.of(
            _compile(sampler._prefill.lower(params, shaped, new_tokens=N, num_samples=n))
        )
        logits, cache = jax.eval_shape(prefill, params, shaped)
        R = prompts * n
        i32, f32 = jnp.int32, jnp.float32
        sds = jax.ShapeDtypeStruct
        decode = sampler._decode.lower(
            params, logits, cache, sds((R,), i32), sds((prompts,), i32), sds((R,), jnp.bool_),
            jax.eval_shape(lambda: jax.random.split(jax.random.key(0), prompts)),
            sds((), f32), sds((), f32), sds((), f32), sds((1,), i32),
            max_new_tokens=N, greedy=False, top_k=0, use_top_p=False, use_min_p=False,
        )  # fmt: skip
        dec = ProgramMemory.of(_compile(decode))
        # the params are counted with the state; decoding reads only the decoder's
        pre = dataclasses.replace(pre, argument=pre.argument - per_device_bytes(params))
        dec = dataclasses.replace(dec, argument=dec.argument - per_device_bytes(params.text))
        return max((pre, dec), key=lambda m: m.peak)


def batch_grid(config: Qwen2_5_VLConfig, image_size: int) -> np.ndarray:
    """The patch grid [1, h, w] of a square image of `image_size` pixels."""
    vision = config.vision
    side = image_size // (vision.patch_size * vision.spatial_merge_size) * vision.spatial_merge_size
    return np.array([1, side, side])


def plan_memory(cfg: TrainConfig, *, max_prompt_tokens: int, image_size: int) -> dict[str, Any]:
    """The plan of a run (see the module doc): {"peak_bytes_per_device", "parts", ...}."""
    cfg = cfg.resolved()
    with tempfile.TemporaryDirectory() as tmp:
        config = _model_config(cfg, Path(tmp))
    mesh = distributed.process_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    planner = _Planner(cfg, config, mesh)
    step = planner.train_step(planner.micro(max_prompt_tokens, image_size))
    sampler = planner.sampler(max_prompt_tokens, image_size)
    state = per_device_bytes(planner.state)
    frozen = per_device_bytes(planner.frozen) if planner.frozen is not None else 0
    ref = 0
    if cfg.algorithm.kl_coef > 0:
        ref = frozen if planner.lora is not None else per_device_bytes(planner.params)
        ref = 0 if planner.lora is not None else ref  # LoRA's reference is the base itself
    cast_copy = 0
    if planner.lora is None and cfg.optim.param_dtype != cfg.optim.compute_dtype:
        cast_copy = per_device_bytes(planner.rollout_params())
    update_phase = step.peak + ref
    rollout_phase = state + frozen + ref + cast_copy + sampler.peak
    parts = {
        "train_state": state,
        "frozen_base": frozen,
        "reference_params": ref,
        "train_step_argument": step.argument,
        "train_step_output": step.output,
        "train_step_temp": step.temp,
        "train_step_alias": step.alias,
        "rollout_params_copy": cast_copy,
        "sampler_argument_without_params": sampler.argument,
        "sampler_output": sampler.output,
        "sampler_temp": sampler.temp,
        "sampler_alias": sampler.alias,
        "update_phase": update_phase,
        "rollout_phase": rollout_phase,
    }
    rows = cfg.rollout.groups_per_batch * cfg.rollout.group_size
    return {
        "peak_bytes_per_device": max(update_phase, rollout_phase),
        "parts": parts,
        "devices": int(mesh.devices.size),
        "mesh": dict(zip(mesh.axis_names, mesh.devices.shape, strict=True)),
        "backend": jax.default_backend(),
        "model_type": config.model_type,
        "rows_per_step": rows,
        "micro_batch_size": cfg.optim.micro_batch_size or rows // cfg.algorithm.minibatches,
        "prompt_tokens": max_prompt_tokens,
        "completion_tokens": cfg.rollout.num_generation_tokens,
        "image_size": image_size,
        "lora_rank": cfg.optim.lora_rank,
        "param_dtype": cfg.optim.param_dtype,
        "compute_dtype": cfg.optim.compute_dtype,
        "optimizer": cfg.optim.optimizer,
        "remat": cfg.optim.remat,
    }


def _model_config(cfg: TrainConfig, tmp: Path) -> Qwen2_5_VLConfig:
    """The model's config.json (the tiny preset's, written to `tmp`, without --model_dir)."""
    if cfg.model_dir:
        path = Path(cfg.model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"--model_dir {cfg.model_dir} has no config.json")
        return Qwen2_5_VLConfig.from_file(path)
    from vlmgym_envs import make as make_env

    from vlmgym_train.presets import write_tiny_preset

    target = write_tiny_preset(tmp / "preset", make_env(cfg.env_name, **cfg.env_kwargs_dict),
                               seed=cfg.seed, family=cfg.preset_family)  # fmt: skip
    return Qwen2_5_VLConfig.from_file(target / "config.json")


def format_plan(plan: dict[str, Any]) -> str:
    """A readable table of a plan (GiB per device)."""
    lines = [
        f"memory plan: {plan['model_type']}, {plan['devices']} device(s) {plan['mesh']}, "
        f"{plan['rows_per_step']} rows x ({plan['prompt_tokens']} prompt + "
        f"{plan['completion_tokens']} completion) tokens, micro-batches of "
        f"{plan['micro_batch_size']} rows, backend {plan['backend']}",
    ]
    for name, value in plan["parts"].items():
        lines.append(f"  {name:<34} {value / GIB:9.2f} GiB")
    lines.append(f"  {'peak per device':<34} {plan['peak_bytes_per_device'] / GIB:9.2f} GiB")
    return "\n".join(lines)


def write_plan(plan: dict[str, Any], directory: str | Path) -> Path:
    """`plan.json` in `directory`, written atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "plan.json"
    tmp = target.with_name(".plan.json.tmp")
    tmp.write_text(json.dumps(plan, indent=2) + "\n")
    tmp.replace(target)
    return target


def warn_if_over_memory(cfg: TrainConfig) -> str | None:
    """Before a run on an accelerator: a warning when the plan's peak exceeds a device's
    memory (`memory_stats()["bytes_limit"]`), else None. On the CPU backend (no limit to
    compare with) nothing is planned. A plan that fails is reported, never fatal."""
    if jax.default_backend() == "cpu":
        return None
    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    if not limit:
        return None
    try:
        plan = plan_memory(cfg, max_prompt_tokens=cfg.rollout.max_prompt_tokens or 512,
                           image_size=cfg.run.plan_image_size)  # fmt: skip
    except Exception as err:
        return f"the memory plan failed ({type(err).__name__}: {err}); running anyway"
    peak = plan["peak_bytes_per_device"]
    if peak <= limit:
        return None
    return (
        f"the memory plan needs {peak / GIB:.1f} GiB per device, more than the "
        f"{limit / GIB:.1f} GiB available: lower --micro_batch_size, use --remat, LoRA "
        "(--lora_rank), bf16 params with Adafactor, or more --mesh_fsdp devices "
        "(vlmgym-train --plan shows the parts)"
    )
