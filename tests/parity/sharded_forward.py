"""Run in a subprocess with 8 simulated CPU devices: sharded forward vs saved logits.

Usage: python sharded_forward.py MODEL_DIR INPUTS.npz FSDP TENSOR
(INPUTS.npz: ids, mask, logits, and optionally pixels and grids)
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import numpy as np
from vlmgym_model import forward, load_model, make_mesh


def main() -> None:
    model_dir, inputs, fsdp, tensor = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    assert jax.device_count() == 8, jax.devices()
    mesh = make_mesh(data=8 // (fsdp * tensor), fsdp=fsdp, tensor=tensor)
    data = np.load(inputs)
    with jax.default_matmul_precision("highest"):
        config, params = load_model(model_dir, dtype=jnp.float32, mesh=mesh)
        shardings = {str(a.sharding.spec) for a in jax.tree.leaves(params)}
        sharded = [
            a
            for a in jax.tree.leaves(params)
            if len(a.sharding.device_set) == 8 and not a.sharding.is_fully_replicated
        ]
        assert sharded, f"nothing was sharded: {shardings}"
        images = (data["pixels"], data["grids"]) if "pixels" in data else (None, None)
        logits = np.asarray(forward(params, config, data["ids"], data["mask"], *images))
    diff = float(np.abs(logits - data["logits"])[data["mask"] == 1].max())
    print(f"max_abs_diff={diff} sharded_arrays={len(sharded)}")


if __name__ == "__main__":
    main()
