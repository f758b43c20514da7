"""Attention kernels for vlm-gym, each beside a plain-jnp reference with the same signature.

The model calls the functions below with an explicit `impl` (one of `IMPLS`):

* `"reference"`: the plain-jnp ground truth (`vlmgym_kernels.reference`);
* `"xla"`: structured jnp that skips what the mask rules out (`vlmgym_kernels.xla`):
  GQA without repeated kv heads, query-chunked causal attention, block-sparse vision
  windows. Exact, runs on every backend; the default and the CPU choice.
* `"pallas"`: Pallas kernels lowered to Triton (`pallas_flash`, `pallas_decode`), NVIDIA
  GPUs only; calling it on another backend raises and names the alternatives;
* `"pallas_interpret"`: the same Pallas kernels through Pallas' interpreter, on any
  backend; slow, for tests.

`attention` and `vision_attention` are differentiable under every impl (the Pallas flash
kernel has its own `custom_vjp`); `decode_attention` is forward-only under the Pallas impls.
`prefix_decode_attention` (group sampling: a prompt's cache read once for all its samples)
has reference and xla implementations; the Pallas impls run the xla one.
Nothing here probes hardware at import time; the backend is checked at call time.
"""

from vlmgym_kernels.dispatch import (
    IMPLS,
    attention,
    decode_attention,
    prefix_decode_attention,
    vision_attention,
)

__all__ = [
    "IMPLS",
    "attention",
    "decode_attention",
    "prefix_decode_attention",
    "vision_attention",
]
