"""Attention kernels for vlm-gym, each beside a plain-jnp reference with the same signature.

The model calls the functions below with an explicit `impl`:

* `"reference"`: the plain-jnp ground truth (`vlmgym_kernels.reference`);
* `"xla"`: works everywhere and is the default.

Nothing here probes hardware at import time.
"""

from vlmgym_kernels.dispatch import IMPLS, attention, decode_attention, vision_attention

__all__ = ["IMPLS", "attention", "decode_attention", "vision_attention"]
