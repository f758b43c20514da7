"""`vlmgym-sample`: generate completions for one prompt (with images) from a model_dir."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from vlmgym_model.cli import flag, parse_args
from vlmgym_model.host_malloc import tune_for_checkpoint


@dataclasses.dataclass(frozen=True)
class SampleArgs:
    """Sample completions from a vlm-gym model directory.

    Completions go to stdout (one block per sample); throughput goes to stderr.
    """

    model_dir: str = flag(
        help="model directory (vlmgym-convert output or a trained policy)",
        aliases=("--ckpt_dir",),
    )
    prompt: str = flag("", "the user's text")
    image: list[str] = dataclasses.field(
        default_factory=list, metadata={"help": "image path; repeat for several images"}
    )
    system: str | None = flag(None, "system prompt")
    num_generation_tokens: int = flag(256, "tokens to generate", aliases=("--max_new_tokens",))
    temperature: float = flag(0.7, "0 is greedy")
    top_p: float = flag(1.0, "nucleus mass (1 = off)")
    top_k: int = flag(0, "top-k (0 = off)")
    min_p: float = flag(0.0, "min-p (0 = off)")
    seed: int = flag(0, "PRNG seed")
    num_samples: int = flag(1, "samples to draw")
    dtype: str = flag("bfloat16", "weight dtype: bfloat16 or float32")
    vlm_max_pixels: int | None = flag(
        None, "image pixel budget (default: preprocessor config)", aliases=("--max_pixels",)
    )
    attention_impl: str = flag("xla", "attention implementation (see vlmgym_kernels)")

    debug: bool = flag(False, "show the traceback of an error")

    def __post_init__(self) -> None:
        if not self.prompt and not self.image:
            raise ValueError("give a --prompt, an --image, or both")
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"--dtype must be bfloat16 or float32, got {self.dtype!r}")
        if self.vlm_max_pixels is not None and self.vlm_max_pixels < 1:
            raise ValueError(f"--vlm_max_pixels must be >= 1, got {self.vlm_max_pixels}")
        self.sampling()  # the sampling options are checked before any weight is read

    def sampling(self) -> Any:
        """The sampling options (`SamplingParams` checks them)."""
        from vlmgym_model.sampling_math import SamplingParams

        return SamplingParams(
            max_new_tokens=self.num_generation_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            num_samples=self.num_samples,
        )


def main(argv: Sequence[str] | None = None, *, tune_malloc: bool = False) -> int:
    args = parse_args(SampleArgs, argv, prog="vlmgym-sample")
    if tune_malloc:  # before the first JAX computation (vlmgym_model.host_malloc)
        tune_for_checkpoint(args.model_dir)

    import jax
    import jax.numpy as jnp
    from PIL import Image, UnidentifiedImageError

    from vlmgym_model.checkpoint import load_model
    from vlmgym_model.processing import Processor
    from vlmgym_model.sampling import Sampler

    content: list[dict] = []
    for path in args.image:
        try:
            with Image.open(path) as im:
                im.load()
                content.append({"type": "image", "image": im.copy()})
        except (OSError, UnidentifiedImageError) as err:
            print(f"vlmgym-sample: error: cannot read image {path}: {err}", file=sys.stderr)
            return 2
    if args.prompt:
        content.append({"type": "text", "text": args.prompt})
    # text alone as a plain string, as HF users write it (templates of text-only models read
    # the content as a string)
    messages = [{"role": "user", "content": content if args.image else args.prompt}]
    if args.system:
        messages.insert(0, {"role": "system", "content": args.system})

    try:
        config, params = load_model(args.model_dir, dtype=getattr(jnp, args.dtype))
        processor = Processor.from_model_dir(args.model_dir)
    except (OSError, ValueError) as err:
        if args.debug:
            raise
        print(f"vlmgym-sample: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    sampler = Sampler(config, processor, impl=args.attention_impl, max_pixels=args.vlm_max_pixels)
    sampling = args.sampling()
    gen = sampler.generate(params, [messages], sampling, jax.random.key(args.seed))
    for i, sample in enumerate(gen.samples[0]):
        if args.num_samples > 1:
            print(f"--- sample {i} ({sample.length} tokens, {sample.finish_reason})")
        print(sample.text)
    t = gen.timings
    n = gen.num_generated_tokens
    print(
        f"[vlmgym-sample] {n} tokens; inputs {t['inputs_s']:.2f}s, "
        f"vision + prefill {t['prefill_s']:.2f}s"
        f", decode {t['decode_s']:.2f}s ({n / max(t['decode_s'], 1e-9):.1f} tokens/s, first call "
        "includes compilation)",
        file=sys.stderr,
    )
    return 0


def run() -> int:
    """The `vlmgym-sample` program: `main` on the command line, with glibc's malloc tuned for XLA
    when the model is large (`vlmgym_model.host_malloc`). Tests call `main` itself and leave
    their process's malloc alone."""
    return main(tune_malloc=True)


if __name__ == "__main__":
    raise SystemExit(run())
