"""`vlmgym-train`: the main job. With no arguments it trains the tiny preset on `shapes`."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from vlmgym_model import is_large_checkpoint, malloc_in_use, parse_args, tune_for_checkpoint

from vlmgym_train.config import TrainConfig


def main(argv: Sequence[str] | None = None, *, tune_malloc: bool = False) -> int:
    cfg = parse_args(TrainConfig, argv, prog="vlmgym-train")
    if tune_malloc:  # before the first JAX computation (vlmgym_model.host_malloc)
        tune_for_checkpoint(cfg.model_dir)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("vlmgym_train").setLevel(logging.INFO)
    from vlmgym_train.trainer import Trainer, TrainingError

    try:
        trainer = Trainer(cfg)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"vlmgym-train: error: {err}", file=sys.stderr)
        return 2
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


def run() -> int:
    """The `vlmgym-train` program: `main` on the command line, with glibc's malloc tuned for XLA
    when the model is large (`vlmgym_model.host_malloc`). Tests call `main` itself and leave
    their process's malloc alone."""
    return main(tune_malloc=True)


if __name__ == "__main__":
    raise SystemExit(run())
