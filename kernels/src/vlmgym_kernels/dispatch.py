"""One dispatch per kernel: the caller names the implementation explicitly.

`impl` is one of `IMPLS`:

* `"reference"`: plain jnp, fp32 softmax over the dense mask (`vlmgym_kernels.reference`);
* `"xla"`: structured jnp (`vlmgym_kernels.xla`); exact, runs on every backend, the default;
* `"pallas"`: the Pallas kernels lowered to Triton; NVIDIA GPUs only;
* `"pallas_interpret"`: the same Pallas kernels through Pallas' interpreter; any backend,
  slow, meant for tests.

The backend is checked when a function is called, never at import.
"""

from __future__ import annotations

import jax

from vlmgym_kernels import pallas_decode, pallas_flash, reference, xla

IMPLS = ("xla", "reference", "pallas", "pallas_interpret")


def _pallas_interpret(impl: str, kernel: str) -> bool:
    """Validate `impl`; for the Pallas impls, whether to interpret."""
    if impl not in IMPLS:
        raise ValueError(f"unknown {kernel} impl {impl!r}; choose one of {IMPLS}")
    if impl == "pallas" and jax.default_backend() != "gpu":
        raise ValueError(
            f"{kernel}: impl='pallas' lowers to Triton and needs an NVIDIA GPU, but JAX's "
            f"default backend is {jax.default_backend()!r}; use impl='xla' (fast everywhere) "
            "or impl='pallas_interpret' (the same kernels, interpreted, for tests)."
        )
    return impl == "pallas_interpret"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    *,
    causal: bool = True,
    scale: float | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Prefill / training attention; see `reference.attention` for the contract."""
    interpret = _pallas_interpret(impl, "attention")
    args = (q, k, v, q_segment_ids, kv_segment_ids)
    if impl == "reference":
        return reference.attention(*args, causal=causal, scale=scale)
    if impl == "xla":
        return xla.attention(*args, causal=causal, scale=scale)
    return pallas_flash.attention(*args, causal=causal, scale=scale, interpret=interpret)


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    starts: jax.Array | None = None,
    *,
    scale: float | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Decode attention over a ragged KV cache; see `reference.decode_attention`."""
    interpret = _pallas_interpret(impl, "decode_attention")
    if impl == "reference":
        return reference.decode_attention(q, k, v, lengths, starts, scale=scale)
    if impl == "xla":
        return xla.decode_attention(q, k, v, lengths, starts, scale=scale)
    return pallas_decode.decode_attention(
        q, k, v, lengths, starts, scale=scale, interpret=interpret
    )


def prefix_decode_attention(
    q: jax.Array,
    prefix_k: jax.Array,
    prefix_v: jax.Array,
    prefix_starts: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    scale: float | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Decode attention with a prompt cache shared by groups of rows; see
    `reference.prefix_decode_attention`. There is no Pallas kernel for it: the Pallas
    impls run the xla one (plain batched matmuls; not yet timed on a GPU)."""
    _pallas_interpret(impl, "prefix_decode_attention")
    args = (q, prefix_k, prefix_v, prefix_starts, k, v, lengths)
    if impl == "reference":
        return reference.prefix_decode_attention(*args, scale=scale)
    return xla.prefix_decode_attention(*args, scale=scale)


def vision_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    max_segment_len: int | None = None,
    scale: float | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Block-diagonal vision attention; see `reference.vision_attention`."""
    interpret = _pallas_interpret(impl, "vision_attention")
    kwargs = {"max_segment_len": max_segment_len, "scale": scale}
    if impl == "reference":
        return reference.vision_attention(q, k, v, segment_ids, **kwargs)
    if impl == "xla":
        return xla.vision_attention(q, k, v, segment_ids, **kwargs)
    return pallas_flash.vision_attention(q, k, v, segment_ids, interpret=interpret, **kwargs)
