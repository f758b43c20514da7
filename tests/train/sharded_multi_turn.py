"""Run in a subprocess with 8 simulated CPU devices: a multi-turn step (3 turns, images
returned in turns 2 and 3) on one device and on a (data 2, fsdp 2, tensor 2) mesh.

Usage: python sharded_multi_turn.py RUN_ROOT
Prints `tokens_equal=... max_logp_diff=... rows=... loss_diff=... max_param_diff=...`.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax
import numpy as np
import vlmgym_envs
from fixtures.multi_turn import PictureBook
from vlmgym_train.config import TrainConfig
from vlmgym_train.grpo import collect_groups, score_groups, update
from vlmgym_train.trainer import Trainer


def main() -> None:
    root = sys.argv[1]
    assert jax.device_count() == 8
    vlmgym_envs.register("picture_book", PictureBook, overwrite=True)
    common = dict(
        env_name="picture_book", max_turns=3, groups_per_batch=2, group_size=4,
        num_generation_tokens=4, total_steps=1, progress=False, seed=3, temperature=1.0,
    )  # fmt: skip
    with jax.default_matmul_precision("highest"):
        one = Trainer(TrainConfig.flat(save_dir=f"{root}/one", mesh_data=1, mesh_fsdp=1, **common))
        many = Trainer(
            TrainConfig.flat(
                save_dir=f"{root}/many", mesh_data=2, mesh_fsdp=2, mesh_tensor=2, **common
            )
        )
        a = collect_groups(one.setup, one.rollout_params(), 0)
        b = collect_groups(many.setup, many.rollout_params(), 0)
        samples = [[s for t in r.turns for g in t.generation.samples for s in g] for r in (a, b)]
        equal = len(samples[0]) == len(samples[1]) and all(
            np.array_equal(x.tokens, y.tokens) for x, y in zip(*samples, strict=True)
        )
        logp = max(
            float(np.abs(x.logprobs - y.logprobs).max()) for x, y in zip(*samples, strict=True)
        )
        batch_a, *_ = score_groups(one.setup, a)
        batch_b, *_ = score_groups(many.setup, b)
        one.state, (m_one,) = update(one.setup, one.state, batch_a, 0)
        many.state, (m_many,) = update(many.setup, many.state, batch_b, 0)
    pa = jax.tree.leaves(jax.device_get(one.state.params))
    pb = jax.tree.leaves(jax.device_get(many.state.params))
    diff = max(float(np.abs(x - y).max()) for x, y in zip(pa, pb, strict=True))
    turns = max(t.turns for t in a.trajectories)
    print(
        f"tokens_equal={equal} max_logp_diff={logp} rows={batch_a.num_rows} turns={turns} "
        f"loss_diff={abs(float(m_one['loss']) - float(m_many['loss']))} max_param_diff={diff}"
    )


if __name__ == "__main__":
    main()
