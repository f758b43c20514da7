"""params/ checkpoints (and adapters' arrays/): sha256 manifests checked on load, NaN and
inf refused by tensor, corrupt orbax files as one-line errors, and saves that leave the old
params whole when they fail (a full disk simulated by monkeypatched OSError(ENOSPC))."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vlmgym_model import (
    AdapterError,
    LoraConfig,
    Qwen2_5_VLConfig,
    init_random_params,
    load_adapters,
    load_model,
    save_adapters,
    save_model,
)
from vlmgym_model.checkpoint import flatten_params, save_params, unflatten_params
from vlmgym_model.integrity import MANIFEST, CheckpointIntegrityError
from vlmgym_model.lora import LoraPair, adapter_specs
from vlmgym_model.qwen2_5_vl.model import param_specs
from vlmgym_model.tiny import tiny_config_dict

SPECIAL = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>"]
CONFIG = Qwen2_5_VLConfig.from_hf_dict(
    tiny_config_dict(
        {t: i for i, t in enumerate([*SPECIAL, *(f"w{i}" for i in range(59))])},
        hidden_size=32,
        intermediate_size=48,
        vision_hidden_size=16,
    )
)


def host(params) -> dict[str, np.ndarray]:
    return {n: np.array(x, np.float32) for n, x in flatten_params(params).items()}


def files(params_dir: Path) -> list[str]:
    paths = (p for p in params_dir.rglob("*") if p.is_file())
    return sorted(p.relative_to(params_dir).as_posix() for p in paths)


def hidden(directory: Path) -> list[str]:
    """Temporary leftovers: hidden entries (`.params.tmp-*`, `.config.json.tmp-*`, ...)."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """A model_dir saved by `save_model`, and its params on the host."""
    root = tmp_path_factory.mktemp("saved")
    params = init_random_params(CONFIG, jax.random.key(0), scale=0.5)
    save_model(root / "m", CONFIG, params)
    return root / "m", host(params)


@pytest.fixture
def model_dir(saved, tmp_path) -> Path:
    """A fresh copy of the saved model_dir, alone in its parent."""
    shutil.copytree(saved[0], tmp_path / "m")
    return tmp_path / "m"


def assert_loads(model_dir: Path, want: dict[str, np.ndarray]) -> None:
    _, params = load_model(model_dir, dtype=jnp.float32)
    got = host(params)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_round_trip_writes_a_manifest_of_every_file(saved, model_dir):
    manifest = json.loads((model_dir / "params" / MANIFEST).read_text())
    listed = set(manifest["files"])
    assert listed == set(files(model_dir / "params")) - {MANIFEST}
    assert any(name.startswith("ocdbt.process_0/d/") for name in listed)
    assert_loads(model_dir, saved[1])
    assert hidden(model_dir) == [] and hidden(model_dir.parent) == []


@pytest.mark.parametrize("which", ["largest", "_METADATA"])
def test_a_flipped_byte_is_an_error_naming_the_file(model_dir, which):
    params_dir = model_dir / "params"
    if which == "largest":
        rel = max(files(params_dir), key=lambda r: (params_dir / r).stat().st_size)
    else:
        rel = which
    data = bytearray((params_dir / rel).read_bytes())
    data[len(data) // 2] ^= 0x40
    (params_dir / rel).write_bytes(bytes(data))
    with pytest.raises(CheckpointIntegrityError, match="do not match their sha256") as err:
        load_model(model_dir)
    assert str(params_dir / rel) in str(err.value) and "\n" not in str(err.value)


def test_a_truncated_file_is_an_error_naming_it(model_dir):
    params_dir = model_dir / "params"
    rel = max(files(params_dir), key=lambda r: (params_dir / r).stat().st_size)
    data = (params_dir / rel).read_bytes()
    (params_dir / rel).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointIntegrityError, match="truncated or replaced") as err:
        load_model(model_dir)
    assert str(params_dir / rel) in str(err.value)


def test_checkpoint_without_manifest_loads_with_a_warning(saved, model_dir, caplog):
    (model_dir / "params" / MANIFEST).unlink()
    with caplog.at_level(logging.WARNING, logger="vlmgym_model.integrity"):
        assert_loads(model_dir, saved[1])
    assert f"has no {MANIFEST}" in caplog.text


# Orbax's reader leaves an asyncio callback behind after TensorStore's error: noise, not ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "how", ["_METADATA truncated", "_METADATA garbage", "manifest.ocdbt garbage", "data garbage"]
)
def test_corrupt_orbax_files_without_manifest_are_integrity_errors(model_dir, how):
    """A checkpoint from before manifests: orbax's and TensorStore's own errors, wrapped."""
    params_dir = model_dir / "params"
    (params_dir / MANIFEST).unlink()
    name, kind = how.split()
    if name == "data":
        d = params_dir / "ocdbt.process_0" / "d"
        rel = max(d.iterdir(), key=lambda p: p.stat().st_size).relative_to(params_dir)
    else:
        rel = Path(name)
    target = params_dir / rel
    data = target.read_bytes()
    rng = np.random.default_rng(0)
    bad = data[: len(data) // 2] if kind == "truncated" else rng.bytes(8192)
    target.write_bytes(bad)
    with pytest.raises(CheckpointIntegrityError, match="params checkpoint at") as err:
        load_model(model_dir)
    assert str(params_dir) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_non_finite_weights_are_an_error_naming_the_tensor(tmp_path, dtype):
    flat = host(init_random_params(CONFIG, jax.random.key(1), scale=0.5))
    flat["text.layers.q_proj"][1, 3, 0, 2] = np.nan
    flat["vision.patch_embed"][0, 0] = np.inf
    save_model(tmp_path / "m", CONFIG, unflatten_params(CONFIG, flat))
    with pytest.raises(CheckpointIntegrityError, match="non-finite") as err:
        load_model(tmp_path / "m", dtype=dtype)
    message = str(err.value)
    assert "text.layers.q_proj" in message and "vision.patch_embed" in message
    assert "text.embed" not in message


def test_save_refuses_an_existing_checkpoint_without_force(saved, model_dir):
    before = files(model_dir / "params")
    with pytest.raises(FileExistsError, match="force=True"):
        save_params(model_dir / "params", unflatten_params(CONFIG, saved[1]))
    assert files(model_dir / "params") == before


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fail_save(monkeypatch, where: str) -> None:
    """Make the next save fail at `where` as a full disk would."""
    if where == "orbax, partway":  # orbax had begun its own temporary directory

        def save(self, directory, *args, **kwargs):
            partial = Path(f"{directory}.orbax-checkpoint-tmp-1")
            partial.mkdir(parents=True)
            (partial / "_METADATA").write_bytes(b"{")
            _enospc()

        monkeypatch.setattr(ocp.StandardCheckpointer, "save", save)
    elif where == "orbax, at the end":  # after the arrays were written
        real = ocp.StandardCheckpointer.save

        def save(self, *args, **kwargs):
            real(self, *args, **kwargs)
            self.wait_until_finished()
            _enospc()

        monkeypatch.setattr(ocp.StandardCheckpointer, "save", save)
    elif where == "manifest":
        monkeypatch.setattr(os, "fsync", _enospc)
    else:  # the rename of the new directory into place
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if Path(src).is_dir():
                _enospc()
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("where", ["orbax, partway", "orbax, at the end", "manifest", "rename"])
def test_a_failed_save_leaves_the_old_params_and_no_temporaries(
    saved, model_dir, monkeypatch, where
):
    new = init_random_params(CONFIG, jax.random.key(2), scale=0.5)
    with monkeypatch.context() as m:
        _fail_save(m, where)
        with pytest.raises(OSError) as err:
            save_params(model_dir / "params", new, force=True)
    assert err.value.errno == errno.ENOSPC
    assert hidden(model_dir) == [], "temporary directories left behind"
    assert_loads(model_dir, saved[1])
    save_params(model_dir / "params", new, force=True)  # the disk has room again
    assert_loads(model_dir, host(new))
    assert hidden(model_dir) == []


def _adapters(seed: int) -> tuple[dict, LoraConfig]:
    cfg = LoraConfig(rank=2, targets=("q_proj", "v_proj"))
    rng = np.random.default_rng(seed)
    specs = adapter_specs(param_specs(CONFIG), cfg)
    pairs = {
        path: LoraPair(*(rng.normal(size=s.shape).astype(np.float32) for s in (p.a, p.b)))
        for path, p in specs.items()
    }
    return pairs, cfg


def test_adapter_arrays_carry_a_manifest_and_refuse_nan(saved, tmp_path):
    pairs, cfg = _adapters(0)
    directory = save_adapters(tmp_path / "lora", pairs, cfg, saved[0])
    arrays = directory / "arrays"
    listed = set(json.loads((arrays / MANIFEST).read_text())["files"])
    assert listed == set(files(arrays)) - {MANIFEST}
    assert sorted(load_adapters(directory).adapters) == sorted(pairs)
    rel = max(files(arrays), key=lambda r: (arrays / r).stat().st_size)
    data = bytearray((arrays / rel).read_bytes())
    data[len(data) // 2] ^= 0x08
    (arrays / rel).write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="do not match their sha256") as err:
        load_adapters(directory)
    assert str(arrays / rel) in str(err.value)
    pairs["text.layers.v_proj"].b[0, 0, 0] = np.inf
    save_adapters(directory, pairs, cfg, saved[0], force=True)
    with pytest.raises(AdapterError, match=r"non-finite .* text\.layers\.v_proj\.b"):
        load_adapters(directory)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(data=st.data())
def test_fuzzed_params_bytes_load_exactly_or_fail_by_name(saved, tmp_path_factory, data):
    """Any flip, truncation or extension of any file under params/ (manifest included) is a
    `CheckpointIntegrityError` naming a file, or loads the very same weights: never other
    exceptions, never silently different weights."""
    source, want = saved
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(source, root / "m")
    params_dir = root / "m" / "params"
    target = params_dir / data.draw(st.sampled_from(files(params_dir)), label="file")
    raw = bytearray(target.read_bytes())
    how = data.draw(st.sampled_from(["flip", "truncate", "extend"]), label="how")
    if how == "flip" and raw:
        at = data.draw(st.integers(0, len(raw) - 1), label="at")
        raw[at] ^= data.draw(st.integers(1, 255), label="mask")
    elif how == "truncate":
        raw = raw[: data.draw(st.integers(0, max(len(raw) - 1, 0)), label="keep")]
    else:
        raw += data.draw(st.binary(min_size=1, max_size=64), label="tail")
    target.write_bytes(bytes(raw))
    try:
        assert_loads(root / "m", want)
    except CheckpointIntegrityError as err:
        assert "\n" not in str(err).strip() and str(params_dir) in str(err)
