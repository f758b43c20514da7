"""Text forward throughput: the JAX decoder against HF torch on the same ~0.5B weights (CPU).

A batch of 4 x 256 text tokens, fp32, logits for every position. The JAX run records
HF's median from the same process and the ratio (`extra_info["speedup_vs_hf"]`).
"""

from __future__ import annotations

import numpy as np
import torch
from conftest import median_seconds
from vlmgym_model import forward

B, T = 2, 128


def test_bench_text_forward(benchmark, qwen05b):
    ids = np.random.default_rng(0).integers(0, 150_000, (B, T))
    m = qwen05b

    def ours():
        return forward(m.params, m.config, ids).block_until_ready()

    def hf():
        with torch.inference_mode():
            return m.hf_model(input_ids=torch.as_tensor(ids)).logits

    compile_s = median_seconds(ours, repeats=1, warmup=0)  # first call: trace + compile
    benchmark.group = f"text forward {B}x{T} (0.5B, fp32)"
    out = benchmark.pedantic(ours, rounds=3, warmup_rounds=1)
    hf_s = median_seconds(hf, repeats=3, warmup=1)
    ours_s = benchmark.stats.stats.median
    benchmark.extra_info.update(
        hf_median_s=hf_s,
        speedup_vs_hf=hf_s / ours_s,
        first_call_s=compile_s,
        tokens_per_s=B * T / ours_s,
        hf_tokens_per_s=B * T / hf_s,
    )
    ref = hf().float().numpy()
    assert np.abs(np.asarray(out) - ref).max() < 1e-2  # same weights (loose: 24 layers, no
    # "highest" matmul precision here; the parity suite holds the strict check)
