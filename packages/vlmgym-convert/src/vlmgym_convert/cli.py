"""`vlmgym-convert`: HF checkpoint -> vlm-gym model_dir, or back with `--to hf`."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Literal

from vlmgym_model.cli import flag, parse_args

from vlmgym_convert.convert import ConversionError, download_hf_repo, hf_to_jax, jax_to_hf


@dataclasses.dataclass(frozen=True)
class ConvertArgs:
    """Convert Qwen2.5-VL checkpoints between HF safetensors and vlm-gym's JAX layout.

    HF -> JAX:  vlmgym-convert --hf_dir HF_DIR --model_dir OUT   (or --hf_repo ID)
    JAX -> HF:  vlmgym-convert --to hf --model_dir DIR --hf_dir OUT
    """

    model_dir: str = flag(help="vlm-gym model directory", aliases=("--ckpt_dir",))
    hf_dir: str | None = flag(None, "HF checkpoint directory (input, or output with --to hf)")
    hf_repo: str | None = flag(
        None,
        "hub id to download instead of --hf_dir, e.g. Qwen/Qwen2.5-VL-7B-Instruct (needs "
        "network access)",
    )
    revision: str | None = flag(None, "hub revision")
    to: Literal["jax", "hf"] = flag("jax", "direction: jax (HF -> vlm-gym) or hf (vlm-gym -> HF)")
    dtype: str | None = flag(None, "bfloat16, float16 or float32; default keeps the source dtype")
    force: bool = flag(False, "overwrite an existing params/ checkpoint")

    def __post_init__(self) -> None:
        if self.to == "hf" and not self.hf_dir:
            raise ValueError("--to hf needs --hf_dir (the output directory)")
        if self.to == "jax" and not (self.hf_dir or self.hf_repo):
            raise ValueError("give --hf_dir or --hf_repo to convert from")
        if self.hf_dir and self.hf_repo and self.to == "jax":
            raise ValueError("give only one of --hf_dir and --hf_repo")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(ConvertArgs, argv, prog="vlmgym-convert")
    try:
        if args.to == "hf":
            out = jax_to_hf(args.model_dir, args.hf_dir or "", dtype=args.dtype)
            print(f"wrote HF checkpoint to {out}")
            return 0
        source = args.hf_dir or str(download_hf_repo(args.hf_repo or "", args.revision))
        config = hf_to_jax(source, args.model_dir, dtype=args.dtype, force=args.force)
        print(
            f"wrote {args.model_dir}: Qwen2.5-VL with {config.text.num_hidden_layers} text layers, "
            f"{config.vision.depth} vision blocks"
        )
        return 0
    except (ConversionError, FileNotFoundError, FileExistsError) as err:
        print(f"vlmgym-convert: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
