"""`vlmgym-train`: the main job. With no arguments it trains the tiny preset on `shapes`."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from vlmgym_model import is_large_checkpoint, malloc_in_use, parse_args, tune_for_checkpoint

from vlmgym_train.config import TrainConfig
from vlmgym_train.errors import USER_ERRORS, user_message


def main(argv: Sequence[str] | None = None, *, tune_malloc: bool = False) -> int:
    cfg = parse_args(TrainConfig, argv, prog="vlmgym-train")
    if tune_malloc:  # before the first JAX computation (vlmgym_model.host_malloc)
        tune_for_checkpoint(cfg.model_dir)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("vlmgym_train").setLevel(logging.INFO)
    if not cfg.run.debug:  # orbax logs its threads' errors with tracebacks; we report them
        logging.getLogger("absl").addFilter(_without_traceback)
    try:
        return plan(cfg) if cfg.run.plan else _train(cfg)
    except USER_ERRORS as err:
        if cfg.run.debug:
            raise
        print(f"vlmgym-train: error: {user_message(err)}", file=sys.stderr)
        return 2


def _without_traceback(record: logging.LogRecord) -> bool:
    """A logging filter: the record's message without its traceback (`--debug` keeps it)."""
    record.exc_info = None
    record.exc_text = None
    return True


def _train(cfg: TrainConfig) -> int:
    from vlmgym_train.trainer import Trainer, TrainingError

    trainer = Trainer(cfg)
    print(f"vlmgym-train: run directory {trainer.run_dir}", file=sys.stderr)
    import jax

    large = is_large_checkpoint(cfg.model_dir)
    if jax.default_backend() == "cpu" and large and malloc_in_use() == "glibc":
        print(
            "vlmgym-train: tip: glibc's malloc runs at its defaults (VLMGYM_TUNE_MALLOC=0, or not "
            "through the vlmgym-train program), so every update page-faults its memory in "
            "again; updates of the 0.5B model ran 1.9x faster with it tuned and 2.5x with "
            "tcmalloc (LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4)",
            file=sys.stderr,
        )
    try:
        trainer.run()
    except TrainingError as err:
        print(f"vlmgym-train: error: {err}", file=sys.stderr)
        return 1
    summary = trainer.summary()
    k = summary["window"]
    print(
        f"vlmgym-train: {summary['steps']} steps; mean reward over the first {k} steps "
        f"{summary['first_reward_mean']:.3f}, over the last {k} {summary['last_reward_mean']:.3f}"
        f"; policy saved to {summary['final_model']}",
        file=sys.stderr,
    )
    return 0


def plan(cfg: TrainConfig) -> int:
    """`--plan`: the run's per-device memory from compiled programs (vlmgym_train.plan)."""
    simulate_cpu_devices(cfg.mesh.data * max(cfg.mesh.fsdp, 1) * cfg.mesh.tensor)
    from vlmgym_train.plan import format_plan, plan_memory, write_plan

    result = plan_memory(
        cfg,
        max_prompt_tokens=cfg.rollout.max_prompt_tokens or 512,
        image_size=cfg.run.plan_image_size,
    )
    print(format_plan(result))
    path = write_plan(result, cfg.run.save_dir or ".")
    print(f"vlmgym-train: wrote {path}", file=sys.stderr)
    return 0


def simulate_cpu_devices(count: int) -> None:
    """Before JAX starts its CPU backend: give it `count` devices, when this machine has no
    accelerator and the mesh asks for more than one (a plan of a pod, made on a laptop)."""
    import os

    flags = os.environ.get("XLA_FLAGS", "")
    if count <= 1 or "xla_force_host_platform_device_count" in flags:
        return
    if os.environ.get("JAX_PLATFORMS", "cpu") not in ("", "cpu") or _has_accelerator():
        return
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def _has_accelerator() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin",
                                                        "libtpu"))  # fmt: skip


def run() -> int:
    """The `vlmgym-train` program: `main` on the command line, with glibc's malloc tuned for XLA
    when the model is large (`vlmgym_model.host_malloc`). Tests call `main` itself and leave
    their process's malloc alone."""
    return main(tune_malloc=True)


if __name__ == "__main__":
    raise SystemExit(run())
