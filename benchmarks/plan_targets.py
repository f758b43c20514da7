"""The memory targets of the scale issue, from `vlmgym-train --plan` (no weights needed).

For Qwen2.5-VL-7B and -3B (published configs in tests/fixtures/configs), bf16 compute,
64 rows x (512 prompt + 256 completion) tokens, one 448 x 448 image per prompt:

    lora        LoRA r=64 on the decoder's attention and MLP, one device
    lean        full fine-tune, bf16 params + Adafactor (factored fp32 statistics) +
                stochastic rounding, one device
    adamw_fsdp8 full fine-tune, AdamW with fp32 master weights, --mesh_fsdp 8
    lean_x4     `lean` with 4x the rows (8 prompts x 32 samples) at the same micro-batch size
    lean_x4_prompts  `lean` with 4x the prompts and images (32 x 8): the vision tower runs
                once per update on all of them, so its memory follows the images

Each plan runs in its own process (the fsdp plan simulates 8 CPU devices). Prints a
markdown table and writes benchmarks/results/plan-targets.json.

    uv run python benchmarks/plan_targets.py [--models qwen2_5_vl_7b] [--micro 4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests/fixtures/configs"
GIB = 2**30
COMMON = [
    "--compute_dtype=bfloat16", "--remat=true", "--groups_per_batch=8", "--group_size=8",
    "--num_generation_tokens=256", "--max_prompt_tokens=512", "--plan_image_size=448",
]  # fmt: skip
LEAN = ["--param_dtype=bfloat16", "--optimizer=adafactor", "--update_rounding=stochastic"]
TARGETS: dict[str, tuple[list[str], float | None]] = {
    "lora": (["--lora_rank=64", "--lora_alpha=128"], 24.0),
    "lean": (LEAN, 75.0),
    "adamw_fsdp8": (["--param_dtype=float32", "--optimizer=adamw", "--mesh_fsdp=8"], 40.0),
    "lean_x4": ([*LEAN, "--group_size=32"], None),
    "lean_x4_prompts": ([*LEAN, "--groups_per_batch=32"], None),
}


def plan(model: str, name: str, micro: int, workdir: Path) -> dict:
    model_dir = workdir / model
    model_dir.mkdir(exist_ok=True)
    shutil.copy(CONFIGS / f"{model}.json", model_dir / "config.json")
    save = workdir / f"{model}-{name}"
    flags, _ = TARGETS[name]
    argv = [sys.executable, "-m", "vlmgym_train.cli", "--plan", f"--model_dir={model_dir}",
            f"--save_dir={save}", f"--micro_batch_size={micro}", *COMMON, *flags]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{model} {name}: {proc.stderr[-2000:]}")
    result = json.loads((save / "plan.json").read_text())
    result["plan_seconds"] = time.perf_counter() - t0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["qwen2_5_vl_7b", "qwen2_5_vl_3b"])
    parser.add_argument("--targets", nargs="+", default=list(TARGETS))
    parser.add_argument("--micro", type=int, default=4, help="--micro_batch_size of every plan")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for name in args.targets:
                result = plan(model, name, args.micro, Path(tmp))
                gib = result["peak_bytes_per_device"] / GIB
                target = TARGETS[name][1]
                rows.append({"model": model, "target": name, "peak_gib": gib,
                             "limit_gib": target, "plan": result})  # fmt: skip
                print(f"{model} {name}: {gib:.2f} GiB ({result['plan_seconds']:.0f} s)",
                      file=sys.stderr)  # fmt: skip
    print("| model | configuration | peak GiB / device | target |")
    print("|---|---|---|---|")
    for r in rows:
        limit = f"<= {r['limit_gib']:.0f}" if r["limit_gib"] else ""
        print(f"| {r['model']} | {r['target']} | {r['peak_gib']:.1f} | {limit} |")
    out = ROOT / "benchmarks/results/plan-targets.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(rows, indent=1) + "\n")
    tmp_out.replace(out)


if __name__ == "__main__":
    main()
