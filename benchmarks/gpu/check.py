"""The prepared GPU check (`benchmarks/gpu/run.sh` runs this file).

Three sections, each timed and guarded on its own:

* kernels: the Pallas attention kernels against the reference, and TFLOP/s against
  `jax.nn.dot_product_attention` (XLA and cuDNN) (`attention_bench.py`);
* sampler: decode tokens/s of a random bf16 3B-shaped model at 64 rows, and its share of
  the HBM-bandwidth roofline (`sampler_bench.py`);
* grpo: one GRPO update at the 3B shape, its MFU, and its peak memory measured, from
  XLA's analysis and from `--plan` (`grpo_bench.py`).

A section that raises is recorded as {"status": "error", ...} and the next one runs; a
section that cannot finish within the time budget is skipped. The results file is written
(atomically) before and after every section, so a run killed from outside still leaves
the sections it finished. `--smoke` runs every section at tiny shapes on any backend
(Pallas through its interpreter) and writes under the temp dir unless `--out` is given.

    bash benchmarks/gpu/run.sh                # on a GPU machine
    bash benchmarks/gpu/run.sh --smoke        # anywhere, a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from attention_bench import kernels_section
from device import device_info, device_slug, error_text
from grpo_bench import grpo_section
from results_table import format_table
from sampler_bench import sampler_section

SECTIONS = ("kernels", "sampler", "grpo")
# Seconds a section needs at least (compiles included); with less left it is skipped.
MIN_SECONDS = {"kernels": 60.0, "sampler": 60.0, "grpo": 90.0}
MIN_SECONDS_SMOKE = {"kernels": 5.0, "sampler": 5.0, "grpo": 5.0}
RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
EXIT_NO_GPU = 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--smoke",
        action="store_true",
        default=os.environ.get("VLMGYM_GPU_CHECK_SMOKE", "") not in ("", "0"),
        help="tiny shapes on any backend (also VLMGYM_GPU_CHECK_SMOKE=1)",
    )
    p.add_argument("--out", help="results file (default: benchmarks/results/<date>-<gpu>.json)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    p.add_argument("--budget_s", type=float, help="seconds for all sections (400; smoke 170)")
    p.add_argument("--impl", help="attention impl of the sampler and GRPO step (default xla)")
    p.add_argument("--plan", help="plan.json of `vlmgym-train --plan` at the GRPO shape")
    args = p.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    if args.budget_s is None:
        args.budget_s = 170.0 if args.smoke else 400.0
    args.impl = args.impl or "xla"
    return args


def results_path(args: argparse.Namespace, device_kind: str) -> Path:
    if args.out:
        return Path(args.out)
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    name = f"{today}-{device_slug(device_kind)}.json"
    if args.smoke:
        return Path(tempfile.gettempdir()) / "vlmgym-gpu-check" / name
    return RESULTS_DIR / name


def write_json(path: Path, results: dict[str, Any]) -> None:
    """Write through a temp file in the same folder and rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(results, f, indent=1, default=float)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_section(
    name: str, fn: Callable[[], dict[str, Any]], seconds_left: Callable[[], float], need: float
) -> dict[str, Any]:
    """Run one section: {"status": "ok" | "error" | "skipped", "seconds", ...}."""
    left = seconds_left()
    if left < need:
        return {
            "status": "skipped",
            "reason": f"{left:.0f} s of the budget left, needs ~{need:.0f}",
        }
    print(f"[{name}] starting, {left:.0f} s of the budget left", flush=True)
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as err:  # one section's failure must not cost the others
        traceback.print_exc()
        result = {
            "status": "error",
            "error": error_text(err),
            "traceback": traceback.format_exc(limit=-6),
        }
    else:
        result = {"status": "ok", **result}
    finally:
        gc.collect()  # drop the section's arrays before the next one allocates
        jax.clear_caches()
    result["seconds"] = time.perf_counter() - start
    print(f"[{name}] {result['status']} in {result['seconds']:.1f} s", flush=True)
    return result


def section_functions(
    args: argparse.Namespace, info: dict[str, Any], seconds_left: Callable[[], float]
) -> dict[str, Callable[[], dict[str, Any]]]:
    peaks = info["peaks"]
    return {
        "kernels": lambda: kernels_section(args.smoke, seconds_left, 2 if args.smoke else 10),
        "sampler": lambda: sampler_section(
            args.smoke, seconds_left, peaks["hbm_bytes_per_s"], args.impl
        ),
        "grpo": lambda: grpo_section(
            args.smoke, seconds_left, peaks["bf16_flops"], args.impl, args.plan
        ),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()

    def seconds_left() -> float:
        return args.budget_s - (time.monotonic() - start)

    info = device_info()
    if not args.smoke and info["backend"] != "gpu":
        print(f"gpu check: JAX's backend is {info['backend']!r}, not 'gpu'; use --smoke")
        return EXIT_NO_GPU
    path = results_path(args, info["device_kind"])
    results: dict[str, Any] = {
        "meta": {
            **info,
            "smoke": args.smoke,
            "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "python": sys.version.split()[0],
            "budget_s": args.budget_s,
            "argv": sys.argv[1:] if argv is None else argv,
        },
        "sections": {},
    }
    functions = section_functions(args, info, seconds_left)
    need = MIN_SECONDS_SMOKE if args.smoke else MIN_SECONDS
    for name in args.sections.split(","):
        results["sections"][name] = {"status": "running"}  # what a killed run leaves
        write_json(path, results)
        results["sections"][name] = run_section(name, functions[name], seconds_left, need[name])
        results["meta"]["elapsed_s"] = time.monotonic() - start
        write_json(path, results)
    print(format_table(results))
    print(f"results: {path}")
    return 0 if all(s["status"] == "ok" for s in results["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
