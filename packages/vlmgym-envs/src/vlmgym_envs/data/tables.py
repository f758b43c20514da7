"""Parquet tables in the Hugging Face `datasets` layout, read row group by row group.

HF parquet stores an `Image` feature as a struct `{"bytes": binary, "path": string}`. A
`ParquetRows` reads the small columns of every file once, and image columns only for the
row group holding the requested row (the last row group read is cached), so a split is
never loaded into memory whole.

Split files are found as HF publishes them: `<root>/<split>-*.parquet`,
`<root>/data/<split>-*.parquet`, `<root>/<split>/*.parquet` or `<root>/**/<split>*.parquet`.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from vlmgym_envs.data.errors import DataError, SkipTask
from vlmgym_envs.data.images import ImageLimits, decode_image


def find_split_files(
    root: str | os.PathLike[str], split: str, suffix: str = ".parquet"
) -> list[Path]:
    """The files of `split` under `root` ending in `suffix` (see the module docstring),
    sorted: `root` itself when it is a file."""
    base = Path(root)
    if base.is_file():
        return [base]
    patterns = [f"{split}{suffix}", f"{split}-*{suffix}", f"data/{split}-*{suffix}",
                f"{split}/*{suffix}", f"**/{split}-*{suffix}", f"**/{split}/*{suffix}",
                f"**/{split}{suffix}"]  # fmt: skip
    for pattern in patterns:
        files = sorted(p for p in base.glob(pattern) if p.is_file())
        if files:
            return files
    return []


class ParquetRows:
    """Rows of one split's parquet files: small columns in memory, images on demand."""

    def __init__(self, files: Sequence[Path], columns: Sequence[str], image_columns: Sequence[str]):
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not files:
            raise DataError("no parquet files given")
        self.files = list(files)
        self.image_columns = list(image_columns)
        self.columns: dict[str, list[Any]] = {c: [] for c in columns}
        self._groups: list[tuple[int, int]] = []  # (file index, row group) per group
        self._starts: list[int] = []  # first global row of each group
        total = 0
        for fi, path in enumerate(self.files):
            try:
                pf = pq.ParquetFile(path)
            except (pa.ArrowInvalid, OSError) as e:
                raise DataError(f"cannot read parquet file {path}: {e}") from e
            names = pf.schema_arrow.names
            missing = [c for c in [*columns, *image_columns] if c not in names]
            if missing:
                raise DataError(f"{path} lacks column(s) {missing}; it has {names}")
            table = pf.read(columns=list(columns))
            for c in columns:
                self.columns[c].extend(table[c].to_pylist())
            for g in range(pf.num_row_groups):
                self._groups.append((fi, g))
                self._starts.append(total)
                total += pf.metadata.row_group(g).num_rows
        self.num_rows = total
        self._cache: tuple[int, dict[str, list[Any]]] | None = None

    def __len__(self) -> int:
        return self.num_rows

    def images(self, row: int, limits: ImageLimits | None = None) -> list[Image.Image]:
        """The decoded images of `row`, one per image column, within `limits` (`SkipTask`
        naming the row and column when one cannot be shown)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        g = bisect.bisect_right(self._starts, row) - 1
        if self._cache is None or self._cache[0] != g:
            fi, group = self._groups[g]
            try:
                table = pq.ParquetFile(self.files[fi]).read_row_group(
                    group, columns=self.image_columns
                )
            except (pa.ArrowException, OSError) as e:
                raise SkipTask(
                    "unreadable_image", f"row {row}: cannot read {self.files[fi]}: {e}"
                ) from e
            self._cache = (g, {c: table[c].to_pylist() for c in self.image_columns})
        values = self._cache[1]
        return [
            image_cell(values[c][row - self._starts[g]], f"row {row} column {c!r}", limits)
            for c in self.image_columns
        ]


def image_cell(cell: Any, what: str, limits: ImageLimits | None = None) -> Image.Image:
    """Decode an HF Image cell (`{"bytes", "path"}` struct, or raw bytes) within `limits`."""
    data = cell.get("bytes") if isinstance(cell, dict) else cell
    if not isinstance(data, bytes | bytearray) or not data:
        raise SkipTask("missing_image", f"{what} holds no image bytes")
    return decode_image(bytes(data), what, limits)


def load_from_disk_rows(path: str | os.PathLike[str], split: str | None) -> Any:
    """A split saved with `datasets`' `save_to_disk`; needs the `datasets` library."""
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            f"{path} looks like a `datasets` save_to_disk folder; reading it needs the "
            "`datasets` library (pip install datasets), or export the split to parquet"
        ) from e
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if split is None or split not in data:
            raise DataError(f"{path} has splits {list(data)}, not {split!r}")
        data = data[split]
    return data
