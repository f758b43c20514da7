"""Reading and writing safetensors files with numpy alone (bf16 through ml_dtypes).

The format: an 8-byte little-endian header length, a JSON header mapping tensor names to
`{dtype, shape, data_offsets}` (offsets relative to the end of the header), then the raw
little-endian bytes. Reading memory-maps the file, so only the tensor being converted is
ever resident.

Opening a file checks its whole header before any tensor is read, as the format requires:
a header length that fits the file, a JSON object without duplicate names, a known dtype,
a shape of non-negative integers and `data_offsets` [begin, end] with
end - begin = prod(shape) * itemsize for every tensor, and ranges that tile the data
exactly (no overlap, no gap, nothing past or short of the end). Any violation is a one-line
`SafetensorsError` naming the file and tensor, so a corrupt header (a flipped digit, a
negative offset, a truncated file) never loads as other weights. The format carries no
checksums: a flipped byte inside a tensor's data is undetectable here (the converter
still refuses the NaN or inf it may produce).
"""

from __future__ import annotations

import json
import math
import os
import struct
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024**2  # the reference implementation's limit


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read as the format specifies."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object that refuses duplicate names (json.loads would keep the last)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate name {key!r}")
        out[key] = value
    return out


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_entry(where: str, info: Any, data_size: int) -> tuple[int, int]:
    """(begin, end) of one header entry, every field checked against the format."""
    if not isinstance(info, dict):
        raise SafetensorsError(f"{where} is not a JSON object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SafetensorsError(f"{where} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise SafetensorsError(f"{where} has shape {shape!r}, not a list of counts")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_count(o) for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise SafetensorsError(f"{where} has data_offsets {offsets!r}, not [begin, end]")
    begin, end = offsets
    if end > data_size:
        raise SafetensorsError(
            f"{where} data offsets {begin}..{end} run past the {data_size} data bytes "
            "(file truncated?)"
        )
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != expected:
        raise SafetensorsError(
            f"{where} data offsets {begin}..{end} do not fit its shape {shape} and dtype "
            f"{dtype} ({expected} bytes)"
        )
    return begin, end


def _check_tiling(path: Path, ranges: list[tuple[int, int, str]], data_size: int) -> None:
    """The tensors' byte ranges cover the data exactly once, in some order."""
    pos, last = 0, None
    for begin, end, name in sorted(ranges):
        if begin < pos:
            raise SafetensorsError(f"{path}: tensors {last!r} and {name!r} overlap")
        if begin > pos:
            raise SafetensorsError(f"{path}: no tensor holds data bytes {pos}..{begin}")
        pos, last = end, name
    if pos != data_size:
        raise SafetensorsError(
            f"{path}: tensors cover {pos} of its {data_size} data bytes (trailing bytes)"
        )


def read_header(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    """(tensor entries, __metadata__, offset of the data) of a safetensors file, checked."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: file is shorter than a header")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise SafetensorsError(f"{path}: header length {n} exceeds the file size {size}")
        try:
            header = json.loads(f.read(n), object_pairs_hook=_object)
        except (ValueError, RecursionError) as err:
            raise SafetensorsError(f"{path}: header is not JSON: {err}") from err
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: __metadata__ is not an object of strings")
    data_size = size - 8 - n
    ranges = []
    for name, info in header.items():
        begin, end = _check_entry(f"{path}: tensor {name!r}", info, data_size)
        ranges.append((begin, end, name))
    _check_tiling(path, ranges, data_size)
    return header, metadata, 8 + n


class SafetensorsFile:
    """Lazy, memory-mapped access to the tensors of one .safetensors file, whose header is
    checked on opening (`read_header`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._header, self.metadata, self._data_start = read_header(self.path)
        self._mmap: np.memmap | None = None

    def names(self) -> list[str]:
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._header[name]["dtype"]]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only array backed by the memory map."""
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        info = self._header[name]
        begin, end = info["data_offsets"]
        buf = self._mmap[self._data_start + begin : self._data_start + end]
        return buf.view(DTYPES[info["dtype"]]).reshape(info["shape"])


def _weight_map(index: Path) -> dict[str, str]:
    """{tensor name: shard file name} of a `model.safetensors.index.json`, checked."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as err:
        raise SafetensorsError(f"{index} is not a safetensors index: {err!r}") from err
    if not isinstance(weight_map, dict):
        raise SafetensorsError(f"{index}: weight_map is not an object")
    for name, filename in weight_map.items():
        if not isinstance(filename, str) or Path(filename).name != filename:
            raise SafetensorsError(f"{index} maps {name!r} to {filename!r}, not a file name")
    return weight_map


def open_checkpoint(hf_dir: str | Path) -> dict[str, SafetensorsFile]:
    """{tensor name: the file holding it} for a single-file or sharded safetensors checkpoint."""
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files: dict[str, SafetensorsFile] = {}
        out: dict[str, SafetensorsFile] = {}
        for name, filename in _weight_map(index).items():
            if filename not in files:
                if not (hf_dir / filename).is_file():
                    raise FileNotFoundError(
                        f"{index} lists shard {filename}, which is not in {hf_dir}"
                    )
                files[filename] = SafetensorsFile(hf_dir / filename)
            if name not in files[filename].names():
                raise SafetensorsError(f"{index} maps {name!r} to {filename}, which lacks it")
            out[name] = files[filename]
        return out
    single = hf_dir / "model.safetensors"
    shards = sorted(hf_dir.glob("*.safetensors"))
    if single.is_file():
        shards = [single]
    if not shards:
        bins = sorted(hf_dir.glob("*.bin"))
        hint = " (found PyTorch .bin files; re-save the model with safetensors)" if bins else ""
        raise FileNotFoundError(f"no .safetensors files in {hf_dir}{hint}")
    out = {}
    for path in shards:
        f = SafetensorsFile(path)
        for name in f.names():
            if name in out:
                raise SafetensorsError(f"tensor {name!r} appears in {out[name].path} and {path}")
            out[name] = f
    return out


def write_safetensors(
    path: str | Path,
    tensors: Iterator[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write tensors to one .safetensors file (header first, then each tensor's bytes),
    through a fsynced temporary sibling renamed over `path` (removed if the write fails)."""
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, arr in items:
        dtype = np.dtype(arr.dtype)
        if dtype not in _NAMES:
            raise SafetensorsError(f"cannot write tensor {name!r} of dtype {dtype}")
        header[name] = {
            "dtype": _NAMES[dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with tmp.open("wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for _, arr in items:
                f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
