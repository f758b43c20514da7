"""The converter on hostile input: corrupt safetensors headers (fuzzed), NaN weights,
output directories that already hold a checkpoint, corrupt params/ and a full disk, all as
one-line errors that leave the files as they were."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_convert import RAW
from vlmgym_convert import ConversionError, hf_to_jax, jax_to_hf
from vlmgym_convert import convert as convert_module
from vlmgym_convert.cli import main
from vlmgym_convert.convert import read_hf_checkpoint
from vlmgym_convert.safetensors_io import (
    SafetensorsError,
    SafetensorsFile,
    open_checkpoint,
    write_safetensors,
)
from vlmgym_model import Qwen2_5_VLConfig, init_random_params, save_model
from vlmgym_model.integrity import CheckpointIntegrityError


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    config = Qwen2_5_VLConfig.from_hf_dict(RAW)
    save_model(root / "src", config, init_random_params(config, jax.random.key(0), scale=0.5))
    return jax_to_hf(root / "src", root / "hf", progress=False)


@pytest.fixture(scope="module")
def model_dir(hf_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "m"
    hf_to_jax(hf_dir, out, progress=False)
    return out


def tensors(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(f.get(k)) for k, f in open_checkpoint(path).items()}


def snapshot(directory: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `directory`."""
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def header_of(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def with_header(header: dict, payload: bytes) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + payload


# ------------------------------------------------------------------ safetensors headers

EMBED = "model.embed_tokens.weight"


def _negative(h):
    h[EMBED]["data_offsets"] = [-64, h[EMBED]["data_offsets"][1] - 64]


def _overlap(h):  # another tensor reads the embedding's bytes (and its own go unread)
    other = next(k for k in h if k not in ("__metadata__", EMBED))
    h[other] = dict(h[EMBED])


def _set(field, value):
    def edit(h):
        h[EMBED][field] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_negative, "not \\[begin, end\\]"),
        (_set("data_offsets", [0, 10**30]), "run past"),
        (_set("data_offsets", [0]), "not \\[begin, end\\]"),
        (_set("shape", [96, 32.0]), "not a list of counts"),
        (_set("shape", [96, True]), "not a list of counts"),
        (_set("shape", [32, 96]), None),  # same size: allowed by the format, refused later
        (_set("shape", [96, 33]), "do not fit its shape"),
        (_set("dtype", "F8"), "unsupported dtype"),
        (_set("dtype", None), "unsupported dtype"),
        (_overlap, "overlap"),
    ],
)
def test_bad_header_fields_are_named(hf_dir, tmp_path, edit, message):
    header, payload = header_of(hf_dir / "model.safetensors")
    edit(header)
    path = tmp_path / "model.safetensors"
    path.write_bytes(with_header(header, payload))
    if message is None:
        assert SafetensorsFile(path).shape(EMBED) == (32, 96)
        return
    with pytest.raises(SafetensorsError, match=message) as err:
        SafetensorsFile(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (struct.pack("<Q", 2**40) + b"{}", "exceeds the file size"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (struct.pack("<Q", 4) + b"{,}x", "not JSON"),
        (struct.pack("<Q", 2) + b"{}" + b"\0" * 8, "trailing bytes"),
        (b"\1\0", "shorter than a header"),
    ],
)
def test_bad_files_are_named(tmp_path, raw, message):
    path = tmp_path / "x.safetensors"
    path.write_bytes(raw)
    with pytest.raises(SafetensorsError, match=message):
        SafetensorsFile(path)


def test_duplicate_names_are_refused(tmp_path):
    a = np.zeros(4, np.float32).tobytes()
    entry = '{"dtype":"F32","shape":[2],"data_offsets":[%d,%d]}'
    blob = ('{"t":' + entry % (0, 8) + ',"t":' + entry % (8, 16) + "}").encode()
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + a)
    with pytest.raises(SafetensorsError, match="duplicate name 't'"):
        SafetensorsFile(path)


@st.composite
def corruptions(draw, size: int, header_end: int):
    """One way to damage a file: truncate it; flip bytes of the length prefix and JSON
    header; change the header length by a few bytes; shift one tensor's data offsets (its
    size kept); or set one header field of a tensor to another JSON value."""
    kind = draw(st.sampled_from(["truncate", "flip", "length", "shift", "field"]))
    if kind == "truncate":
        return kind, draw(st.integers(0, size - 1))
    if kind == "flip":
        flips = st.tuples(st.integers(0, header_end - 1), st.integers(1, 255))
        return kind, draw(st.lists(flips, min_size=1, max_size=3))
    if kind == "length":
        return kind, draw(st.integers(-8, 8).filter(bool))
    tensor = draw(st.integers(0, 64))
    if kind == "shift":
        return kind, (tensor, "data_offsets", draw(st.integers(-512, 512).filter(bool)))
    value = st.one_of(
        st.integers(-(2**40), 2**40),
        st.lists(st.integers(-3, 5000), max_size=3),
        st.sampled_from(["F32", "I32", "F16", "BF16", "U8", "Q4", None, 1.5, {}]),
    )
    field = st.sampled_from(["dtype", "shape", "data_offsets", "other"])
    return kind, (tensor, draw(field), draw(value))


def apply(data: bytes, corruption: tuple) -> bytes:
    kind, arg = corruption
    if kind == "truncate":
        return data[:arg]
    if kind == "flip":
        out = bytearray(data)
        for pos, mask in arg:
            out[pos] ^= mask
        return bytes(out)
    (n,) = struct.unpack("<Q", data[:8])
    if kind == "length":
        return struct.pack("<Q", n + arg) + data[8:]
    index, field, value = arg
    header = json.loads(data[8 : 8 + n])
    name = sorted(k for k in header if k != "__metadata__")[index % (len(header) - 1)]
    if kind == "shift":
        value = [offset + value for offset in header[name]["data_offsets"]]
    header[name][field] = value
    return with_header(header, data[8 + n :])


def test_fuzzed_headers_load_exactly_or_fail_by_name(hf_dir, tmp_path_factory):
    """Any corruption of the header region (`corruptions`) or a truncation of the file
    anywhere: the conversion either reads exactly the original weights or raises
    SafetensorsError / ConversionError.

    Flips inside the tensor data are not fuzzed: safetensors has no checksums, so a flipped
    mantissa bit is undetectable (one that makes a NaN or inf is refused by tensor; see
    test_nan_in_an_hf_checkpoint_is_named).
    """
    original = read_hf_checkpoint(hf_dir, progress=False)[1]
    data = (hf_dir / "model.safetensors").read_bytes()
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    work = tmp_path_factory.mktemp("fuzz")
    (work / "config.json").write_bytes((hf_dir / "config.json").read_bytes())

    @settings(
        max_examples=50,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(corruptions(len(data), header_end))
    def check(corruption):
        (work / "model.safetensors").write_bytes(apply(data, corruption))
        try:
            _, flat = read_hf_checkpoint(work, progress=False)
        except (SafetensorsError, ConversionError) as err:
            assert "\n" not in str(err) or isinstance(err, ConversionError)
            return
        assert flat.keys() == original.keys(), corruption
        for name in original:
            assert flat[name].dtype == original[name].dtype, (name, corruption)
            np.testing.assert_array_equal(flat[name], original[name], err_msg=str(corruption))

    check()


# ------------------------------------------------------------------ values


def test_nan_in_an_hf_checkpoint_is_named(hf_dir, tmp_path, capsys):
    t = tensors(hf_dir)
    t["model.layers.1.mlp.up_proj.weight"][3, 4] = np.nan
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(hf_dir / "config.json", bad / "config.json")
    write_safetensors(bad / "model.safetensors", t)
    assert main(["--hf_dir", str(bad), "--model_dir", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err.startswith("vlmgym-convert: error:")
    assert "'model.layers.1.mlp.up_proj.weight' holds NaN or inf" in err
    assert not (tmp_path / "m").exists()


def test_cast_overflow_and_integer_weights_are_named(hf_dir, tmp_path):
    t = tensors(hf_dir)
    t["model.norm.weight"][0] = 1e6  # finite in float32, inf in float16
    big = tmp_path / "big"
    big.mkdir()
    shutil.copy(hf_dir / "config.json", big / "config.json")
    write_safetensors(big / "model.safetensors", t)
    with pytest.raises(ConversionError, match=r"'model\.norm\.weight' overflows float16"):
        read_hf_checkpoint(big, dtype="float16", progress=False)
    t["model.norm.weight"] = t["model.norm.weight"].astype(np.int32)
    write_safetensors(big / "model.safetensors", t)
    with pytest.raises(ConversionError, match=r"model\.norm\.weight \(int32\)"):
        read_hf_checkpoint(big, progress=False)


# ------------------------------------------------------------------ output directories


def _old_export(directory: Path) -> dict[str, bytes]:
    """A previous sharded export plus a file of the user's, in `directory`."""
    directory.mkdir()
    for k in (1, 2):
        write_safetensors(directory / f"model-0000{k}-of-00002.safetensors", {"x": np.ones(2)})
    (directory / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    (directory / "notes.txt").write_text("mine")
    return snapshot(directory)


def test_export_into_a_non_empty_directory_needs_force(model_dir, hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    before = _old_export(out)
    args = ["--to", "hf", "--model_dir", str(model_dir), "--hf_dir", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not empty" in err and "--force" in err
    assert "model-00001-of-00002.safetensors" in err and "notes.txt" in err
    assert snapshot(out) == before
    assert main([*args, "--force"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names and "notes.txt" in names and "config.json" in names
    assert not [n for n in names if n.startswith("model-") or n.endswith(".index.json")]
    assert hidden(out) == []
    exported, want = tensors(out), tensors(hf_dir)
    assert exported.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(exported[k], want[k], err_msg=k)


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_during_a_forced_export_keeps_the_old_files(
    model_dir, tmp_path, monkeypatch, capsys
):
    """The weights are written, then the disk fills while the side files are copied."""
    out = tmp_path / "out"
    before = _old_export(out)
    monkeypatch.setattr(convert_module, "stage_side_files", _enospc)
    args = ["--to", "hf", "--model_dir", str(model_dir), "--hf_dir", str(out), "--force"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("vlmgym-convert: error:") and "No space left on device" in err
    assert snapshot(out) == before and hidden(out) == []


def test_convert_into_an_existing_model_dir(model_dir, hf_dir, tmp_path, monkeypatch, capsys):
    target = tmp_path / "m"
    shutil.copytree(model_dir, target)
    before = snapshot(target)
    args = ["--hf_dir", str(hf_dir), "--model_dir", str(target)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "params/" in err and "config.json" in err
    assert snapshot(target) == before
    with monkeypatch.context() as m:  # the disk fills while orbax writes
        m.setattr("orbax.checkpoint.StandardCheckpointer.save", _enospc)
        assert main([*args, "--force"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert snapshot(target) == before and hidden(target) == [] and hidden(tmp_path) == []
    assert main([*args, "--force"]) == 0
    assert hidden(target) == [] and hidden(tmp_path) == []
    assert (target / "params" / "manifest.json").is_file()
    assert main([*args, "--to", "hf", "--hf_dir", str(target)]) == 2  # output = input
    assert "also an input" in capsys.readouterr().err


# ------------------------------------------------------------------ corrupt params/


def test_corrupt_params_are_one_line_errors_and_tracebacks_with_debug(model_dir, tmp_path, capsys):
    broken = tmp_path / "m"
    shutil.copytree(model_dir, broken)
    data_dir = broken / "params" / "ocdbt.process_0" / "d"
    largest = max(data_dir.iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0x01
    largest.write_bytes(bytes(data))
    args = ["--to", "hf", "--model_dir", str(broken), "--hf_dir", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("vlmgym-convert: error:") and str(largest) in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointIntegrityError):
        main([*args, "--debug"])
    assert main(["--to", "hf", "--model_dir", str(tmp_path / "nope"), "--hf_dir", "x"]) == 2
    assert "no config.json" in capsys.readouterr().err
