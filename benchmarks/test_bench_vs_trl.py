"""TRL's GRPOTrainer step against vlm-gym's on the same work, in one process.

The work is `test_bench_grpo_step.py`'s: the real-weights 0.5B checkpoint
(`tests/fixtures/real_model.py`), text only, 4 prompts x 4 samples x up to 32 new tokens
(temperature 1, stopping at EOS), the `WordCountEnv` prompts and reward, AdamW lr 1e-6, fp32
parameters, no reference model (beta = kl_coef = 0), one optimizer step per generation.

TRL (`trl.GRPOTrainer`, HF `Qwen2_5_VLForConditionalGeneration` in fp32 on the CPU) runs
first, in a spawned child process (so its memory is all returned when it ends); then vlm-gym's
`Trainer` runs the same steps in the test's process. The TRL side:

- one optimizer step = one generation of 16 completions: per_device_train_batch_size 16,
  gradient_accumulation_steps 1, steps_per_generation 1, num_generations 4, num_iterations 1
  (so TRL computes no old-policy log-probs: the loss's ratio is against its own detached
  log-probs, as ours is against the sampler's);
- `max_completion_length` 32, temperature 1 (top_p 1, top_k off: TRL's defaults), beta 0,
  loss_type TRL's default ("dapo"), learning rate 1e-6, AdamW (`adamw_torch`, weight decay
  0), max_grad_norm 1 (both trainers clip at 1), a linear schedule to 0 over the run (the
  learning rate's value costs nothing);
- gradient checkpointing OFF (TRL defaults it on; ours runs without remat by default), or
  on with VLMGYM_BENCH_TRL_GC=1;
- precision from VLMGYM_BENCH_TRL_PRECISIONS, a comma list of `fp32` (no bf16, the default)
  and `bf16` (`bf16=True`: accelerate's bf16 autocast on the CPU over fp32 weights); each is a
  separate TRL run with a freshly loaded model;
- the processing class is the checkpoint's tokenizer with the checkpoint's Qwen2.5-VL chat
  template (chat_template.json, the one the Qwen2.5-VL processor uses and ours renders with).
  The Qwen2.5-VL processor itself cannot be built here: its video processor needs
  torchvision, which the dev group does not install. For text-only prompts TRL's processor
  path differs only in wrapping string content into text blocks before the same template.

Timing: a `TrainerCallback` takes wall time from on_step_begin to on_step_end (generation,
rewards, advantages, forward + backward, clipping and the optimizer: everything but logging),
and a subclass times `_generate_and_score_completions` (rollout: tokenising, HF `generate`,
decoding, rewards, advantages) and within it `_generate_single_turn` (`generate` alone);
update = step - rollout; on_pre_optimizer_step .. on_optimizer_step is the optimizer. The first
step (1 + VLMGYM_BENCH_GRPO_STEPS steps in all) is a warm-up and not counted. vlm-gym's
side times `grpo.collect_groups` + `score_groups` + `update` exactly as
test_bench_grpo_step.py does, with compute dtype VLMGYM_BENCH_DTYPE (float32 by default,
or bfloat16).

Reported (medians over the timed steps; extra_info and printed as JSON): per TRL precision
step_s, rollout_s, generate_s, update_s, optimizer_s, completion tokens per step and the
padded shapes; ours rollout_s, sample_s, update_s, step_s and tokens; the ratio TRL step /
our step for each TRL row. Tokens generated differ between the two (different random draws,
both stop at EOS), so the ratios of seconds per generated token are reported too.

Before running, make sure about 14 GB of memory is free: each side holds the fp32 model,
its gradients and AdamW's two moments (about 10 GB for TRL's 630M untied parameters).

Run: uv run pytest benchmarks/test_bench_vs_trl.py -q -s
     VLMGYM_BENCH_DTYPE=bfloat16 VLMGYM_BENCH_TRL_PRECISIONS=fp32,bf16 uv run pytest \
         benchmarks/test_bench_vs_trl.py -q -s
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import test_bench_grpo_step as grpo

STEPS = int(os.environ.get("VLMGYM_BENCH_GRPO_STEPS", 2))
DTYPE = os.environ.get("VLMGYM_BENCH_DTYPE", "float32")
TRL_PRECISIONS = [
    p for p in os.environ.get("VLMGYM_BENCH_TRL_PRECISIONS", "fp32").split(",") if p
]  # empty: ours only
TRL_GC = os.environ.get("VLMGYM_BENCH_TRL_GC", "0") == "1"


def word_count_prompts() -> list[dict[str, Any]]:
    """WordCountEnv's tasks as a TRL dataset: the same user message and the target count."""
    env = grpo.WordCountEnv()
    rows = []
    for idx in range(len(env)):
        n, obs = env.reset(idx)
        (message,) = obs.messages
        (text,) = (part["text"] for part in message["content"] if part["type"] == "text")
        rows.append({"prompt": [{"role": "user", "content": text}], "target": n})
    return rows


def word_count_reward(prompts, completions, target, **kwargs) -> list[float]:
    """WordCountEnv.step's reward for each completion."""
    env = grpo.WordCountEnv()
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [env.step(n, text).reward for n, text in zip(target, texts, strict=True)]


def rss_gb() -> float:
    """This process's resident memory, GB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def run_trl(hf_dir: Path, out_dir: Path, precision: str) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    records: list[dict[str, float]] = []
    current: dict[str, float] = {}

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            start = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            current["rollout_s"] = time.perf_counter() - start
            current["tokens"] = float(out["completion_mask"].sum())
            current["R"], current["T"] = out["prompt_ids"].shape
            current["N"] = out["completion_ids"].shape[1]
            return out

        def _generate_single_turn(self, *args, **kwargs):
            start = time.perf_counter()
            out = super()._generate_single_turn(*args, **kwargs)
            current["generate_s"] = time.perf_counter() - start
            return out

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            current.clear()
            current["begin"] = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            current["opt_begin"] = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kwargs):
            current["optimizer_s"] = time.perf_counter() - current.pop("opt_begin")

        def on_step_end(self, args, state, control, **kwargs):
            current["step_s"] = time.perf_counter() - current.pop("begin")
            current["update_s"] = current["step_s"] - current["rollout_s"]
            records.append(dict(current))
            print(f"trl {precision} step {len(records) - 1}:", json.dumps(current), flush=True)

    tokenizer = AutoTokenizer.from_pretrained(hf_dir, padding_side="left", truncation_side="left")
    tokenizer.chat_template = json.loads((hf_dir / "chat_template.json").read_text())[
        "chat_template"
    ]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)
    args = GRPOConfig(
        output_dir=str(out_dir / f"trl-{precision}"),
        use_cpu=True,
        bf16=precision == "bf16",
        fp16=False,
        per_device_train_batch_size=grpo.GROUPS * grpo.GROUP_SIZE,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=grpo.GROUP_SIZE,
        num_iterations=1,
        max_completion_length=grpo.NEW_TOKENS,
        temperature=1.0,
        beta=0.0,
        learning_rate=1e-6,
        optim="adamw_torch",
        gradient_checkpointing=TRL_GC,
        max_steps=1 + STEPS,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = TimedGRPOTrainer(
        model=model,
        reward_funcs=word_count_reward,
        args=args,
        train_dataset=Dataset.from_list(word_count_prompts()),
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    params = sum(p.numel() for p in model.parameters())
    trainer.train()
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    del trainer, model
    gc.collect()

    assert len(records) == 1 + STEPS, records
    assert all(np.isfinite(v) for v in losses), losses
    timed = records[1:]

    def med(key: str) -> float:
        return statistics.median(r[key] for r in timed)

    last = timed[-1]
    return {
        "precision": precision,
        "gradient_checkpointing": TRL_GC,
        "params": params,
        "torch_threads": torch.get_num_threads(),
        "allocator": grpo.malloc_in_use(),
        "peak_rss_gb": peak_rss_gb,
        "rows_x_prompt": f"{int(last['R'])} x {int(last['T'])}",
        "rows_x_N": f"{int(last['R'])} x {int(last['N'])}",
        "R": int(last["R"]),
        "T": int(last["T"]),
        "N": int(last["N"]),
        "step_s": med("step_s"),
        "rollout_s": med("rollout_s"),
        "generate_s": med("generate_s"),
        "update_s": med("update_s"),
        "optimizer_s": med("optimizer_s"),
        "tokens": med("tokens"),
        "steps": [{k: round(v, 3) for k, v in r.items()} for r in records],
    }


def test_bench_vs_trl_real_05b(benchmark, tmp_path):
    pytest.importorskip("trl")
    from fixtures.real_model import real_model_dirs

    dirs = real_model_dirs()
    # Each TRL run is a spawned child process, so that all of its memory is back before the
    # next run or ours starts (freed torch tensors stay in this process's heap otherwise).
    spawn = multiprocessing.get_context("spawn")
    trl_rows = []
    for precision in TRL_PRECISIONS:
        with spawn.Pool(1) as pool:
            trl_rows.append(pool.apply(run_trl, (dirs.hf_dir, tmp_path, precision)))
    rss_after_trl_gb = rss_gb()

    trainer = grpo.make_trainer(str(dirs.model_dir), str(tmp_path / "run"), DTYPE)
    records: list[dict[str, float]] = []
    step = iter(range(1 + STEPS))

    def one_step() -> None:
        i = next(step)
        records.append(grpo.timed_step(trainer, i)[0])
        print(f"ours {DTYPE} step {i}:", json.dumps(records[-1], default=float), flush=True)

    one_step()  # warm-up: compiles the sampler and the update
    benchmark.group = "GRPO step vs TRL, real 0.5B"
    benchmark.pedantic(one_step, rounds=STEPS, warmup_rounds=0)
    timed = records[1:]
    assert all(np.isfinite(r["loss"]) and r["skipped"] == 0 for r in records)

    def med(key: str) -> float:
        return statistics.median(r[key] for r in timed)

    P, T, R, N = (int(timed[-1][k]) for k in "PTRN")
    ours = {
        "dtype": DTYPE,
        "prompts_x_T": f"{P} x {T}",
        "rows_x_N": f"{R} x {N}",
        "rollout_s": med("rollout_s"),
        "sample_s": med("sample_s"),
        "update_s": med("update_s"),
        "step_s": med("step_s"),
        "tokens": med("tokens"),
        "update_flops": grpo.update_flops(trainer.config, P, T, R, N, row_layout=False),
        "steps": [
            {k: round(float(v), 3) for k, v in r.items() if k not in ("P", "T", "R", "N")}
            for r in records
        ],
    }
    ours["update_flops_per_s"] = ours["update_flops"] / ours["update_s"]
    comparisons = []
    for row in trl_rows:
        # What TRL's update computes: every row runs its whole prompt + completion.
        row["update_flops"] = grpo.update_flops(
            trainer.config, row["R"], row["T"], row["R"], row["N"], row_layout=True
        )
        row["update_flops_per_s"] = row["update_flops"] / row["update_s"]
        comparisons.append(
            {
                "trl": row["precision"],
                "ours": DTYPE,
                "step_ratio_trl_over_ours": row["step_s"] / ours["step_s"],
                "rollout_ratio": row["rollout_s"] / ours["rollout_s"],
                "update_ratio": row["update_s"] / ours["update_s"],
                "per_token_step_ratio": (row["step_s"] / row["tokens"])
                / (ours["step_s"] / ours["tokens"]),
            }
        )
    info = {
        # Both sides: the TRL child inherits LD_PRELOAD, and its spawned interpreter imports
        # test_bench_grpo_step, which tunes glibc before torch allocates anything.
        "allocator": grpo.malloc_in_use(),
        "rss_gb_after_trl_freed": rss_after_trl_gb,
        "trl": trl_rows,
        "ours": ours,
        "comparisons": comparisons,
        "steps_timed": STEPS,
    }
    benchmark.extra_info.update(info)
    print(json.dumps(info, indent=1, default=float))
