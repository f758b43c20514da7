"""`vlmgym-eval`: evaluate a model directory on an environment; metrics, records, plots."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from typing import Literal

from vlmgym_model import flag, parse_args, tune_for_checkpoint

from vlmgym_train.errors import USER_ERRORS, make_env, user_message


@dataclasses.dataclass(frozen=True)
class EvalArgs:
    """Evaluate a vlm-gym model directory on an environment.

    Writes metrics.json, records.jsonl (every task's prompt, completion, parsed answer,
    reward and info) and plots to --output_dir; rerunning the same evaluation resumes a
    partial output, and another evaluation's outputs there are refused (--overwrite).
    """

    model_dir: str = flag(help="model directory to evaluate", aliases=("--ckpt_dir",))
    env_name: str = flag("shapes", "environment")
    env_kwargs: str = flag("{}", "JSON keyword arguments for the env")
    split: str | None = flag(None, "dataset split (passed to the env as split=)")
    max_eval_tasks: int | None = flag(None, "evaluate at most this many tasks")
    num_samples: int = flag(1, "samples per task (pass@k / best-of-k)")
    max_turns: int = flag(1, "turn limit for multi-turn environments (tool calls, feedback)")
    num_generation_tokens: int = flag(256, "max new tokens", aliases=("--max_new_tokens",))
    temperature: float = flag(0.0, "0 = greedy")
    top_k: int = flag(0, "top-k (0 = off)")
    top_p: float = flag(1.0, "nucleus mass (1 = off)")
    seed: int = flag(0, "seed for task order and sampling")
    inference_batch_per_device: int = flag(8, "tasks per sampler call per device")
    vlm_max_pixels: int | None = flag(
        None, "image pixel budget (default: preprocessor config)", aliases=("--max_pixels",)
    )
    output_dir: str = flag("eval_out", "where outputs go")
    overwrite: bool = flag(False, "delete another evaluation's outputs in --output_dir first")
    dtype: Literal["bfloat16", "float32"] = flag("bfloat16", "weight dtype")
    attention_impl: str = flag("xla", "attention implementation")
    max_skip_fraction: float = flag(
        0.1, "stop when more than this fraction of tasks cannot be read (each is counted)"
    )
    debug: bool = flag(False, "show the traceback of an error")

    def __post_init__(self) -> None:
        for name in ("num_samples", "num_generation_tokens", "inference_batch_per_device",
                     "max_eval_tasks", "vlm_max_pixels"):  # fmt: skip
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"--temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 <= self.max_skip_fraction <= 1:
            raise ValueError(f"--max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1] (1: off), got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"--top_k must be >= 0 (0: off), got {self.top_k}")
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"--dtype must be bfloat16 or float32, got {self.dtype!r}")
        try:
            kwargs = json.loads(self.env_kwargs)
        except json.JSONDecodeError as err:
            raise ValueError(f"--env_kwargs is not valid JSON: {err}") from None
        if not isinstance(kwargs, dict):
            raise ValueError("--env_kwargs must be a JSON object")


def main(argv: Sequence[str] | None = None, *, tune_malloc: bool = False) -> int:
    args = parse_args(EvalArgs, argv, prog="vlmgym-eval")
    if tune_malloc:  # before the first JAX computation (vlmgym_model.host_malloc)
        tune_for_checkpoint(args.model_dir)
    try:
        return _evaluate(args)
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"vlmgym-eval: error: {user_message(err)}", file=sys.stderr)
        return 2


def _evaluate(args: EvalArgs) -> int:
    import jax
    import jax.numpy as jnp
    from vlmgym_model import Processor, Sampler, load_model, model_fingerprint

    from vlmgym_train.evaluate import EvalConfig, evaluate

    kwargs = json.loads(args.env_kwargs)
    if args.split is not None:
        kwargs["split"] = args.split
    env = make_env(args.env_name, kwargs)
    identity = {
        "model_fingerprint": model_fingerprint(args.model_dir),
        "env_name": args.env_name,
        "env_kwargs": kwargs,
        "dtype": args.dtype,
        "vlm_max_pixels": args.vlm_max_pixels,
    }
    config, params = load_model(args.model_dir, dtype=getattr(jnp, args.dtype))
    processor = Processor.from_model_dir(args.model_dir)
    sampler = Sampler(config, processor, impl=args.attention_impl, max_pixels=args.vlm_max_pixels)
    result = evaluate(
        params,
        sampler,
        env,
        EvalConfig(
            max_eval_tasks=args.max_eval_tasks,
            num_samples=args.num_samples,
            num_generation_tokens=args.num_generation_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            batch_size=args.inference_batch_per_device * jax.local_device_count(),
            progress=True,
            max_skip_fraction=args.max_skip_fraction,
            max_turns=args.max_turns,
        ),
        output_dir=args.output_dir,
        identity=identity,
        overwrite=args.overwrite,
    )
    width = max(len(k) for k in result.metrics)
    print(f"{'metric':<{width}}  value")
    for k, v in sorted(result.metrics.items()):
        print(f"{k:<{width}}  {v:.4f}")
    print(f"outputs in {args.output_dir}", file=sys.stderr)
    return 0


def run() -> int:
    """The `vlmgym-eval` program: `main` on the command line, with glibc's malloc tuned for XLA
    when the model is large (`vlmgym_model.host_malloc`). Tests call `main` itself and leave
    their process's malloc alone."""
    return main(tune_malloc=True)


if __name__ == "__main__":
    raise SystemExit(run())
