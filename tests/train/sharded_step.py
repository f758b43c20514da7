"""Run in a subprocess with 8 simulated CPU devices: one update, sharded (in micro-batches of
4 rows) vs single-device (the whole batch at once).

Usage: python sharded_step.py RUN_ROOT FSDP TENSOR
Prints `max_param_diff=... loss_diff=... sharded=... opt_sharded=...`.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax
import numpy as np
from vlmgym_train.config import TrainConfig
from vlmgym_train.grpo import collect_groups, score_groups, update
from vlmgym_train.trainer import Trainer


def main() -> None:
    root, fsdp, tensor = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    assert jax.device_count() == 8
    common = dict(
        groups_per_batch=2, group_size=4, num_generation_tokens=3, total_steps=1,
        progress=False, seed=0,
    )  # fmt: skip
    with jax.default_matmul_precision("highest"):
        single = Trainer(TrainConfig.flat(save_dir=f"{root}/single", mesh_fsdp=1, **common))
        sharded = Trainer(
            TrainConfig.flat(
                save_dir=f"{root}/sharded",
                mesh_fsdp=fsdp,
                mesh_tensor=tensor,
                micro_batch_size=4,
                **common,
            )
        )
        # the same rollouts feed both updates
        rollouts = collect_groups(single.setup, single.rollout_params(), 0)
        batch, *_ = score_groups(single.setup, rollouts)
        single.state, (m_single,) = update(single.setup, single.state, batch, 0)
        sharded.state, (m_sharded,) = update(sharded.setup, sharded.state, batch, 0)
        m_single, m_sharded = jax.tree.map(float, (m_single, m_sharded))
    leaves = jax.tree.leaves(sharded.state.params)
    n_sharded = sum(not leaf.sharding.is_fully_replicated for leaf in leaves)
    opt = jax.tree.leaves(sharded.state.opt_state)
    n_opt = sum(not leaf.sharding.is_fully_replicated for leaf in opt)  # AdamW's moments
    a = jax.tree.leaves(jax.device_get(single.state.params))
    b = jax.tree.leaves(jax.device_get(sharded.state.params))
    diff = max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))
    print(
        f"max_param_diff={diff} loss_diff={abs(m_single['loss'] - m_sharded['loss'])} "
        f"sharded={n_sharded} opt_sharded={n_opt} grad_norm={m_single['grad_norm']}"
    )


if __name__ == "__main__":
    main()
