"""Reading and writing safetensors files with numpy alone (bf16 through ml_dtypes).

The format: an 8-byte little-endian header length, a JSON header mapping tensor names to
`{dtype, shape, data_offsets}` (offsets relative to the end of the header), then the raw
little-endian bytes. Reading memory-maps the file, so only the tensor being converted is
ever resident.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

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


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read as the format specifies."""


class SafetensorsFile:
    """Lazy, memory-mapped access to the tensors of one .safetensors file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        with self.path.open("rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise SafetensorsError(f"{self.path}: file is shorter than a header")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise SafetensorsError(f"{self.path}: header length {n} exceeds the file size")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise SafetensorsError(f"{self.path}: header is not JSON: {err}") from err
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._header: dict[str, dict] = header
        self._data_start = 8 + n
        self._mmap: np.memmap | None = None
        for name, info in header.items():
            if info.get("dtype") not in DTYPES:
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}"
                )
            begin, end = info["data_offsets"]
            expected = DTYPES[info["dtype"]].itemsize * int(np.prod(info["shape"], dtype=np.int64))
            if end - begin != expected or self._data_start + end > size:
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} data offsets {begin}..{end} do not fit its "
                    f"shape {info['shape']} and dtype {info['dtype']} (file truncated?)"
                )

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


def open_checkpoint(hf_dir: str | Path) -> dict[str, SafetensorsFile]:
    """{tensor name: the file holding it} for a single-file or sharded safetensors checkpoint."""
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map: Mapping[str, str] = json.loads(index.read_text())["weight_map"]
        files: dict[str, SafetensorsFile] = {}
        out: dict[str, SafetensorsFile] = {}
        for name, filename in weight_map.items():
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
    """Write tensors to one .safetensors file (header first, then each tensor's bytes)."""
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
    tmp = Path(str(path) + ".tmp")
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, arr in items:
            f.write(np.ascontiguousarray(arr).tobytes())
    tmp.replace(path)
