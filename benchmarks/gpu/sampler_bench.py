"""Sampler decode throughput on a random bf16 model, against the HBM-bandwidth roofline.

`vlmgym_model.Sampler.generate_ids` on P prompts x n samples (64 rows at "3b"), text only,
temperature 1, every row decoding all N new tokens (the stop id is outside the vocabulary,
so it is never sampled). The first call compiles; the second is timed, and
`timings["decode_s"]` (the jitted while-loop plus fetching its result) is the decode time.

Roofline. Decoding one token for every row is bound by memory traffic: each of the N - 1
decode steps must read

    every text weight once (bf16; with tied embeddings the output projection reads the
    embedding matrix, the input lookup only R rows of it), plus
    the KV cache: 2 (k, v) x L x K x H x 2 bytes per cached token, over P x T prompt
    tokens (a prompt's cache is stored once for its n samples) and R generated tokens at
    the average step's length, N / 2.

roofline_share = (N - 1) x bytes_per_step / decode_s / HBM bytes/s. Left out: activations,
the [R, V] float32 logits (0.6% of the weights at 64 rows of the 3B shape), the sampling
kernels, and that the "xla" decode attention reads all N generated slots every step rather
than the valid ones; so 1.0 is an upper bound no implementation reaches.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from model_shapes import count_params, model_config, random_params, tree_bytes
from vlmgym_model import Sampler, SamplingParams


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    model: str  # a `model_shapes.TEXT_SHAPES` key
    prompts: int  # P
    samples: int  # n per prompt; R = P * n rows
    prompt_len: int  # T
    new_tokens: int  # N


SHAPES = {
    "gpu": DecodeShape(model="3b", prompts=64, samples=1, prompt_len=64, new_tokens=256),
    "smoke": DecodeShape(model="smoke", prompts=8, samples=1, prompt_len=16, new_tokens=16),
}


def decode_bytes_per_step(config: Any, params_text: Any, s: DecodeShape) -> dict[str, float]:
    """The bytes one decode step must read (see the module docstring)."""
    cfg = config.text
    slot = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2  # bf16
    rows = s.prompts * s.samples
    kv = slot * (s.prompts * s.prompt_len + rows * s.new_tokens / 2)
    weights = tree_bytes(params_text)
    return {"weight_bytes": float(weights), "kv_bytes": float(kv), "total": float(weights + kv)}


def sampler_section(
    smoke: bool, seconds_left: Callable[[], float], hbm_bytes_per_s: float | None, impl: str
) -> dict[str, Any]:
    del seconds_left  # one indivisible measurement
    s = SHAPES["smoke" if smoke else "gpu"]
    config = model_config(s.model)
    params = random_params(config, jnp.bfloat16)
    V = config.text.vocab_size
    sampler = Sampler(
        config,
        stop_token_ids=[V],  # outside the vocabulary: never sampled, rows run to N tokens
        length_buckets=(s.prompt_len,),
        batch_buckets=(s.prompts,),
        impl=impl,
    )
    ids = np.random.default_rng(0).integers(0, V - 4, (s.prompts, s.prompt_len))  # [P, T]
    sampling = SamplingParams(max_new_tokens=s.new_tokens, temperature=1.0, num_samples=s.samples)

    def generate(seed: int) -> Any:
        return sampler.generate_ids(
            params, ids, np.ones_like(ids), sampling, jax.random.key(seed), decode_text=False
        )

    start = time.perf_counter()
    generate(0)
    first_call_s = time.perf_counter() - start
    gen = generate(1)
    rows, N = s.prompts * s.samples, s.new_tokens
    decode_s = gen.timings["decode_s"]
    per_step = decode_bytes_per_step(config, params.text, s)
    achieved = (N - 1) * per_step["total"] / decode_s
    return {
        "shape": dataclasses.asdict(s),
        "rows": rows,
        "impl": impl,
        "text_params": count_params(params.text),
        "first_call_s": first_call_s,
        "prefill_s": gen.timings["prefill_s"],
        "decode_s": decode_s,
        "decode_tokens_per_s": rows * N / decode_s,
        "all_rows_full_length": all(x.length == N for group in gen.samples for x in group),
        "bytes_per_step": per_step,
        "achieved_bytes_per_s": achieved,
        "roofline_share": None if hbm_bytes_per_s is None else achieved / hbm_bytes_per_s,
        "compilations": dict(sampler.compilations),
    }
