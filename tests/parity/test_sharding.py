"""The forward pass with params sharded over fsdp and tensor equals the single-device one."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures.parity_io import sharded_forward
from vlmgym_model import forward


@pytest.mark.parametrize(("fsdp", "tensor"), [(2, 4), (4, 2)])
def test_sharded_forward_matches_single_device(converted, tol, tmp_path, fsdp, tensor):
    m = converted("untied_gqa4")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 240, (4, 10))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding on one row
    logits = np.asarray(forward(m.params, m.config, ids, mask))
    diff, sharded = sharded_forward(
        m.model_dir, tmp_path, fsdp, tensor, ids=ids, mask=mask, logits=logits
    )
    assert diff <= tol["float32"]
    assert sharded > 0
