"""`vlmgym-convert`: HF checkpoint -> vlm-gym model_dir, or back with `--to hf` / `--to peft`.

Expected failures (missing or non-empty directories, corrupt or mismatched checkpoints, a
full disk) end with `vlmgym-convert: error: <message>` on stderr and exit code 2; `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Literal

from vlmgym_model.cli import flag, parse_args

from vlmgym_convert.convert import (
    download_hf_repo,
    hf_to_jax,
    jax_to_hf,
    parse_dtype,
)
from vlmgym_convert.peft_export import jax_to_peft


@dataclasses.dataclass(frozen=True)
class ConvertArgs:
    """Convert Qwen-VL checkpoints between HF safetensors and vlm-gym's JAX layout.

    HF -> JAX:  vlmgym-convert --hf_dir HF_DIR --model_dir OUT   (or --hf_repo ID)
    JAX -> HF:  vlmgym-convert --to hf --model_dir DIR --hf_dir OUT [--adapter_dir A]
    LoRA -> PEFT: vlmgym-convert --to peft --model_dir BASE --adapter_dir A --hf_dir OUT
    """

    model_dir: str = flag(help="vlm-gym model directory", aliases=("--ckpt_dir",))
    hf_dir: str | None = flag(
        None, "HF checkpoint directory (input, or output with --to hf / --to peft)"
    )
    hf_repo: str | None = flag(
        None,
        "hub id to download instead of --hf_dir, e.g. Qwen/Qwen2.5-VL-7B-Instruct (needs "
        "network access)",
    )
    revision: str | None = flag(None, "hub revision")
    to: Literal["jax", "hf", "peft"] = flag(
        "jax",
        "direction: jax (HF -> vlm-gym), hf (vlm-gym -> HF) or peft (LoRA adapters -> a PEFT "
        "adapter directory)",
    )
    adapter_dir: str | None = flag(
        None,
        "LoRA adapter directory trained on --model_dir: exported alone with --to peft, merged "
        "into the weights with --to hf",
    )
    base_model_name_or_path: str | None = flag(
        None,
        "--to peft: the base written to adapter_config.json (hub id or HF directory); "
        "default: --model_dir",
    )
    dtype: str | None = flag(None, "bfloat16, float16 or float32; default keeps the source dtype")
    force: bool = flag(
        False,
        "write into an output directory that holds something, replacing the checkpoint "
        "there (its files are replaced only once the new ones are complete)",
    )
    debug: bool = flag(False, "show the traceback of an error, not one line")

    def __post_init__(self) -> None:
        if self.to in ("hf", "peft") and not self.hf_dir:
            raise ValueError(f"--to {self.to} needs --hf_dir (the output directory)")
        if self.to == "peft" and not self.adapter_dir:
            raise ValueError(
                "--to peft needs --adapter_dir: only LoRA adapters export to PEFT, and a model "
                "trained without LoRA has none (export it whole with --to hf)"
            )
        if self.to == "jax" and self.adapter_dir:
            raise ValueError("--adapter_dir is read only with --to hf or --to peft")
        if self.to == "jax" and not (self.hf_dir or self.hf_repo):
            raise ValueError("give --hf_dir or --hf_repo to convert from")
        if self.hf_dir and self.hf_repo and self.to == "jax":
            raise ValueError("give only one of --hf_dir and --hf_repo")
        parse_dtype(self.dtype)  # a ValueError naming the choices


def _export(args: ConvertArgs) -> str:
    """--to hf / --to peft: write the export, return what was written."""
    if args.to == "peft":
        out = jax_to_peft(
            args.model_dir,
            args.adapter_dir or "",
            args.hf_dir or "",
            dtype=args.dtype,
            base_model_name_or_path=args.base_model_name_or_path,
            force=args.force,
        )
        return f"wrote PEFT LoRA adapters to {out}"
    out = jax_to_hf(
        args.model_dir,
        args.hf_dir or "",
        dtype=args.dtype,
        adapter_dir=args.adapter_dir,
        force=args.force,
    )
    merged = f" with the adapters of {args.adapter_dir} merged" if args.adapter_dir else ""
    return f"wrote HF checkpoint to {out}{merged}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(ConvertArgs, argv, prog="vlmgym-convert")
    try:
        if args.to in ("hf", "peft"):
            print(_export(args))
            return 0
        source = args.hf_dir or str(download_hf_repo(args.hf_repo or "", args.revision))
        config = hf_to_jax(source, args.model_dir, dtype=args.dtype, force=args.force)
        print(
            f"wrote {args.model_dir}: {config.model_type} with {config.text.num_hidden_layers} "
            f"text layers, {config.vision.depth} vision blocks"
        )
        return 0
    except (ValueError, OSError) as err:  # every checkpoint error is a ValueError
        if args.debug:
            raise
        print(f"vlmgym-convert: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
