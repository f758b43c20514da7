"""Saving and loading params spread over devices: the finiteness check on a mesh in
bfloat16 (8 CPU devices), and the collective save of global arrays by two processes
(process 0 hashes and renames; the other returns only once the checkpoint is in place).

Each case runs in fresh Python processes: the CPU device count and `jax.distributed` are
fixed when JAX starts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from test_checkpoint_integrity import CONFIG

COMMON = """
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from vlmgym_model import Qwen2_5_VLConfig, make_mesh
from vlmgym_model.checkpoint import (
    flatten_params, load_params, save_params, unflatten_params,
)
from vlmgym_model.integrity import CheckpointIntegrityError
from vlmgym_model.qwen2_5_vl.model import param_specs
from vlmgym_model.weights import is_spec, param_shardings

root = Path(sys.argv[1])
config = Qwen2_5_VLConfig.from_file(root / "config.json")


def host_params(seed):  # numpy draws: no compile per shape
    rng = np.random.default_rng(seed)
    specs = flatten_params(param_specs(config), is_spec)
    return {n: rng.normal(0, 0.5, s.shape).astype(np.float32) for n, s in specs.items()}


def check_shards(params, want, dtype):
    for name, x in flatten_params(params).items():
        assert x.dtype == dtype, (name, x.dtype)
        for shard in x.addressable_shards:
            expected = want[name][shard.index].astype(dtype)
            np.testing.assert_array_equal(np.asarray(shard.data), expected, err_msg=name)


def expect_nan_error(path, mesh):
    try:
        load_params(path, config, dtype=jnp.bfloat16, mesh=mesh)
    except CheckpointIntegrityError as err:
        assert "text.layers.q_proj" in str(err) and "text.embed" not in str(err), err
    else:
        raise AssertionError("NaN weights loaded")
"""

SHARDED = """
mesh = make_mesh(1, 2, 4)
want = host_params(0)
save_params(root / "clean", unflatten_params(config, want))
params = load_params(root / "clean", config, dtype=jnp.bfloat16, mesh=mesh)
check_shards(params, want, jnp.bfloat16)
assert len(params.text.layers.q_proj.sharding.device_set) == 8
bad = dict(want, **{"text.layers.q_proj": want["text.layers.q_proj"].copy()})
bad["text.layers.q_proj"][0, 5, 3, 1] = np.nan
save_params(root / "nan", unflatten_params(config, bad))
expect_nan_error(root / "nan", mesh)
print("OK")
"""

TWO_PROCESSES = """
pid, port = int(sys.argv[2]), int(sys.argv[3])
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
mesh = make_mesh(1, 2, 2)  # 4 devices, 2 on each process
shardings = flatten_params(param_shardings(param_specs(config), mesh))


def global_params(flat):
    return unflatten_params(config, {
        n: jax.make_array_from_callback(a.shape, shardings[n], lambda idx, a=a: a[idx])
        for n, a in flat.items()
    })


path = root / "params"
for seed, force in ((0, False), (1, True)):  # a new checkpoint, then one over it
    want = host_params(seed)
    save_params(path, global_params(want), force=force)
    assert (path / "manifest.json").is_file(), "returned before process 0 renamed"
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]
    params = load_params(path, config, dtype=jnp.float32, mesh=mesh)
    assert not params.text.embed.is_fully_addressable
    check_shards(params, want, jnp.float32)
want["text.layers.q_proj"][1, 0, 0, 0] = np.nan
save_params(root / "nan", global_params(want))
expect_nan_error(root / "nan", mesh)
print("OK", pid)
"""


def run_script(body: str, args: list[str], devices: int) -> subprocess.Popen:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    # As in tests/train/test_multihost.py: cached cross-process collectives can deadlock.
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    code = textwrap.dedent(COMMON) + textwrap.dedent(body)
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def write_config(root: Path) -> None:
    (root / "config.json").write_text(json.dumps(CONFIG.to_hf_dict()))


def test_nan_check_and_load_on_a_mesh_in_bfloat16(tmp_path):
    write_config(tmp_path)
    proc = run_script(SHARDED, [str(tmp_path)], devices=8)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and out.strip().endswith("OK"), out[-4000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_save_global_arrays_together(tmp_path):
    write_config(tmp_path)
    port = str(free_port())
    procs = [run_script(TWO_PROCESSES, [str(tmp_path), str(pid), port], 2) for pid in (0, 1)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=600)[0])
    finally:
        for proc in procs:
            proc.kill()
    for pid, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0 and f"OK {pid}" in out, f"process {pid}:\n{out[-4000:]}"
