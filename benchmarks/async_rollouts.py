"""Steps per second with asynchronous rollouts (--max_staleness 1) against sampling, then
training (--max_staleness 0), on the tiny preset and on the real-weights 0.5B checkpoint.

Not a test (pytest does not collect it): a script. Each scenario builds a `Trainer` per
setting, takes `--warmup` steps (they compile) and then times `--steps` steps of
`Trainer.step` (no checkpoints: --save_interval beyond the run, so the staleness never
restarts). Scenarios:

1. slow_reward: the shapes env with a reward that sleeps `--sleep_ms` per completion (a
   judge, a sandbox, a geocoder), default batch (8 tasks x 16 samples, 2 new tokens).
2. long_tail: `--long_tokens` new tokens per completion; the tiny preset's random policy
   stops at a random token, so completion lengths spread out geometrically and the
   longest one bounds each batch's decoding (lengths are printed).
3. devices: 8 simulated CPU devices (a child process): all 8 sample and train with K = 0,
   against 4 sampling and 4 training (--rollout_devices 4) with K = 1, with the slow reward;
   `time/param_copy_s` is the copy of the params onto the sampling devices.
4. real: the 0.5B shape. `--model_dir` (default: the real-weights checkpoint of
   `tests/fixtures/real_model.py`, a Qwen2.5-VL whose decoder is the real
   Qwen2.5-Coder-0.5B-Instruct, built on first use) on the text env `wordcount` with the
   slow reward, `--groups` x `--group_size` completions of `--tokens` new tokens, float32
   params with bfloat16 compute, Adafactor, remat, vision frozen (as
   `benchmarks/real_learning.py`). Not part of `all`: minutes on a CPU.

Ratios are K=1 steps/s over K=0 steps/s (> 1: asynchronous is faster). On a CPU the
sampler and the update share the same cores, so the gain comes from what does not use
them (the sleeping reward); on an accelerator the decoding's idle time overlaps too.
Memory is the process's peak RSS and, on an accelerator, the device's peak bytes in use;
both are cumulative over the process, so K=1's figure is the peak of both settings.

    uv run python benchmarks/async_rollouts.py
    uv run python benchmarks/async_rollouts.py --scenario slow_reward --steps 10
    uv run python benchmarks/async_rollouts.py --scenario real    # ~10 min on 2 cores

`--results FILE` adds the results to a JSON file (the GPU check's, `benchmarks/gpu/run.sh`)
under "async_rollouts", rewritten after every scenario (devices, a child process, only
prints). A scenario that raises is recorded as {"status": "error", ...}, the next one runs,
and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

SCENARIOS = ("slow_reward", "long_tail", "devices", "real")
ALL = ("slow_reward", "long_tail", "devices")  # what --scenario all runs
REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
# Defaults that differ between the tiny preset and the real checkpoint.
DEFAULT_STEPS = {"tiny": 6, "real": 3}
DEFAULT_SLEEP_MS = {"tiny": 2.0, "real": 250.0}


def register_slow_env(base: str, sleep_s: float) -> str:
    """Env `base`, its `step_many` sleeping `sleep_s` per completion; its registered name."""
    import vlmgym_envs
    from vlmgym_envs.registry import resolve

    class SlowEnv(resolve(base)):  # type: ignore[misc]
        def step_many(self, states: Any, texts: Any) -> Any:
            time.sleep(sleep_s * len(texts))
            return super().step_many(states, texts)

    name = f"bench-slow-{base}"
    vlmgym_envs.register(name, SlowEnv, overwrite=True)
    return name


def memory() -> dict[str, float | None]:
    """Peak RSS of this process and the first device's peak bytes in use (None on CPU), GiB."""
    import jax

    stats = jax.devices()[0].memory_stats()
    device = stats.get("peak_bytes_in_use") if stats else None
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "peak_rss_gib": rss_kib * 1024 / GIB,
        "device_peak_gib": None if device is None else device / GIB,
    }


def steps_per_second(settings: dict[str, Any], warmup: int, steps: int) -> dict[str, Any]:
    """Time `steps` steps of a `Trainer` with `settings` after `warmup` steps."""
    from vlmgym_train.config import TrainConfig
    from vlmgym_train.trainer import Trainer

    with tempfile.TemporaryDirectory() as run_dir:
        total = warmup + steps
        cfg = TrainConfig.flat(
            save_dir=run_dir, total_steps=total, save_interval=10 * total, progress=False,
            **settings,
        )  # fmt: skip
        trainer = Trainer(cfg)
        metrics = [trainer.step(s) for s in range(warmup)]
        t0 = time.perf_counter()
        metrics = [trainer.step(s) for s in range(warmup, total)]
        elapsed = time.perf_counter() - t0
        trainer.runner.close()

    def mean(key: str) -> float:
        return sum(m.get(key, 0.0) for m in metrics) / len(metrics)

    return {
        "steps_per_s": steps / elapsed,
        "wait_rollout_s": mean("time/wait_rollout_s"),
        "param_copy_s": mean("time/param_copy_s"),
        "length_mean": mean("length/mean"),
        "length_max": max(m["length/max"] for m in metrics),
        **memory(),
    }


def compare(name: str, k0: dict[str, Any], k1: dict[str, Any], args: argparse.Namespace) -> dict:
    """Both settings timed; prints one line each and the ratio."""
    steps, warmup = args.steps, args.warmup
    a = steps_per_second(k0, warmup, steps)
    b = steps_per_second(k1, warmup, steps)
    for label, r in (("K=0", a), ("K=1", b)):
        device = r["device_peak_gib"]
        print(
            f"{name:12s} {label}: {r['steps_per_s']:.4f} steps/s, wait for rollout "
            f"{r['wait_rollout_s']:.3f} s/step, param copy {r['param_copy_s'] * 1e3:.1f} ms/step, "
            f"length mean {r['length_mean']:.1f} max {r['length_max']:.0f}, peak RSS "
            f"{r['peak_rss_gib']:.1f} GiB"
            + ("" if device is None else f", device {device:.1f} GiB"),
            flush=True,
        )
    ratio = b["steps_per_s"] / a["steps_per_s"]
    print(f"{name:12s} ratio K=1 / K=0: {ratio:.2f}x", flush=True)
    return {
        "scenario": name,
        "k0": a,
        "k1": b,
        "ratio": ratio,
        "settings": k0,
        "sleep_ms": args.sleep_ms,
    }


def real_model_dir(args: argparse.Namespace) -> str:
    """`--model_dir`, or the real-weights checkpoint (built on first use: minutes)."""
    if args.model_dir:
        return args.model_dir
    sys.path.insert(0, str(REPO / "tests"))  # fixtures.real_model lives with the tests
    from fixtures.real_model import real_model_dirs

    return str(real_model_dirs().model_dir)


def run_scenario(name: str, args: argparse.Namespace) -> dict:
    if name == "real":
        real = {
            "model_dir": real_model_dir(args),
            "env_name": register_slow_env("wordcount", args.sleep_ms / 1e3),
            "groups_per_batch": args.groups,
            "group_size": args.group_size,
            "num_generation_tokens": args.tokens,
            "optimizer": "adafactor",  # AdamW's moments would add 4 GB at this shape
            "param_dtype": "float32",
            "compute_dtype": "bfloat16",
            "remat": True,
            "logprob_chunk": 256,
            "train_vision": False,  # text only: the random vision tower never sees an image
        }
        return compare(name, real, {**real, "max_staleness": 1}, args)
    slow = {"env_name": register_slow_env("shapes", args.sleep_ms / 1e3)}
    if name == "slow_reward":
        return compare(name, slow, {**slow, "max_staleness": 1}, args)
    if name == "long_tail":
        tail = {"num_generation_tokens": args.long_tokens}
        return compare(name, tail, {**tail, "max_staleness": 1}, args)
    assert name == "devices"
    return compare(name, slow, {**slow, "max_staleness": 1, "rollout_devices": 4}, args)


def add_to_results(path: Path, results: list[dict]) -> None:
    """Put `results` into the list "async_rollouts" of the JSON file `path` (created if
    missing), in place of earlier results of the same scenarios, through a temp file
    renamed over it."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    names = {r["scenario"] for r in results}
    kept = [r for r in data.get("async_rollouts", []) if r.get("scenario") not in names]
    data["async_rollouts"] = kept + results
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, default=float)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenario",
        default="all",
        help=f"comma-separated, from {list(SCENARIOS)}; all: {','.join(ALL)}",
    )
    parser.add_argument("--steps", type=int, help="timed steps per setting (tiny 6, real 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation)")
    parser.add_argument(
        "--sleep_ms", type=float, help="reward time per completion (tiny 2, real 250)"
    )
    parser.add_argument("--long_tokens", type=int, default=48, help="long_tail: max new tokens")
    parser.add_argument("--model_dir", help="real: checkpoint (default: the real-weights one)")
    parser.add_argument("--groups", type=int, default=2, help="real: tasks per step")
    parser.add_argument("--group_size", type=int, default=4, help="real: samples per task")
    parser.add_argument("--tokens", type=int, default=8, help="real: max new tokens")
    parser.add_argument("--results", type=Path, help="JSON file to add the results to")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = ALL if args.scenario == "all" else tuple(args.scenario.split(","))
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {list(SCENARIOS)}")
    args.scenarios = names
    return args


def main() -> None:
    args = parse_args()
    steps, sleep_ms = args.steps, args.sleep_ms
    results: list[dict] = []
    for name in args.scenarios:
        kind = "real" if name == "real" else "tiny"
        args.steps = DEFAULT_STEPS[kind] if steps is None else steps
        args.sleep_ms = DEFAULT_SLEEP_MS[kind] if sleep_ms is None else sleep_ms
        if name == "devices" and not args.child:  # 8 devices: set before JAX starts
            env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
            argv = [sys.executable, __file__, "--scenario=devices", "--child",
                    f"--steps={args.steps}", f"--warmup={args.warmup}",
                    f"--sleep_ms={args.sleep_ms}"]  # fmt: skip
            subprocess.run(argv, check=True, env=env)
            continue
        try:
            results.append({"status": "ok", **run_scenario(name, args)})
        except Exception as err:  # one scenario's failure must not cost the others
            traceback.print_exc()
            error = f"{type(err).__name__}: {err}"
            results.append({"scenario": name, "status": "error", "error": error})
        if args.results:
            add_to_results(args.results, results)
    if results:
        print(json.dumps(results))
    if any(r["status"] != "ok" for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
