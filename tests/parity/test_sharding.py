"""The forward pass with params sharded over fsdp and tensor equals the single-device one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from vlmgym_model import forward

SCRIPT = Path(__file__).with_name("sharded_forward.py")


@pytest.mark.parametrize(("fsdp", "tensor"), [(2, 4), (4, 2)])
def test_sharded_forward_matches_single_device(converted, tol, tmp_path, fsdp, tensor):
    m = converted("untied_gqa4")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 240, (4, 10))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding on one row
    logits = np.asarray(forward(m.params, m.config, ids, mask))
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, ids=ids, mask=mask, logits=logits)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(m.model_dir), str(inputs), str(fsdp), str(tensor)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = re.search(r"max_abs_diff=(\S+) sharded_arrays=(\d+)", proc.stdout)
    assert found, proc.stdout
    assert float(found.group(1)) <= tol["float32"]
    assert int(found.group(2)) > 0
