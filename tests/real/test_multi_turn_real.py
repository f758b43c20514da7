"""Token-exact multi-turn rollouts on real weights: a 3-turn episode with images returned
in turns 2 and 3, the trainer's log-probs of every sampled token against the sampler's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from fixtures.multi_turn import check_token_exact
from vlmgym_model import Processor, Sampler, load_model


def test_three_turns_with_images_are_token_exact_on_real_weights(real_dirs, tol):
    config, params = load_model(real_dirs.model_dir, dtype=jnp.float32)
    processor = Processor.from_model_dir(real_dirs.model_dir)
    sampler = Sampler(config, processor, length_buckets=(128, 256))
    trajs, _ = check_token_exact(config, params, sampler, jax.random.key(0), 8, tol["float32"])
    assert not any(t.info.get("placeholder_in_reply") for t in trajs)
