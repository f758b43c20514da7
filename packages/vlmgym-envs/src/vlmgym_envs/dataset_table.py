"""Where `DatasetEnv`'s rows come from: one `RowTable` over every form a table takes.

`open_table(source, split, download=...)` reads:

- a `datasets.Dataset` or `DatasetDict` object (`split` picks one), or a `save_to_disk`
  folder (`datasets.load_from_disk`: memory-mapped Arrow);
- parquet files in the HF layout (an `Image` column is a struct `{"bytes", "path"}`): one
  file, a glob, or a folder, where a split's files are found by name as HF publishes them
  (`<split>-*.parquet`, `data/<split>-*.parquet`, `<split>/*.parquet`, ...);
- JSON Lines (or a JSON array), and CSV files: a file, a glob, or a folder (same names);
- a hub dataset id (`"owner/name"`, when no such local path exists): the newest snapshot
  in the Hugging Face hub cache holding the split's files, fetched first with
  `download=True` where the network allows.

Columns whose Arrow type holds binary data (HF `Image` structs, lists of them, raw bytes)
are *heavy*: never read whole, only one row's cells at a time (`RowTable.cells`; parquet
reads the one row group holding the row, and keeps the last one). Every other column is
read once into memory (`RowTable.columns`). JSON and CSV files are read whole: they hold
text and image file paths. A JSON or CSV line that cannot be read is dropped and counted
("malformed_row", `RowTable.skips`), never the whole file.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmgym_envs.data.errors import DataError, SkipCounts, SkipTask
from vlmgym_envs.data.hub import hub_cache_dirs
from vlmgym_envs.data.tables import find_split_files

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("parquet", (".parquet",)),
    ("json", (".jsonl", ".ndjson")),
    ("csv", (".csv",)),
    ("json", (".json",)),
)
"""Data file kinds in the order a folder is searched, with their suffixes."""
_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}")


class RowTable:
    """The rows of one split.

    names: every column, in order. columns: the light columns, read whole (name -> one
    value per row). skips: rows dropped while reading, per reason. where: the source, as
    messages name it.
    """

    def __init__(self, names: Sequence[str], columns: dict[str, list[Any]], num_rows: int,
                 where: str, roots: Sequence[Path] = ()) -> None:  # fmt: skip
        self.names = list(names)
        self.columns = columns
        self.num_rows = num_rows
        self.where = where
        self.skips = SkipCounts()
        self._roots = list(roots)

    def __len__(self) -> int:
        return self.num_rows

    def heavy(self, name: str) -> bool:
        """Whether column `name` holds binary data (read one row at a time)."""
        return name in self.names and name not in self.columns

    def roots(self, row: int) -> list[Path]:
        """Folders a relative image path of `row` is looked up in, in order."""
        return list(self._roots)

    def cells(self, row: int, names: Sequence[str]) -> dict[str, Any]:
        """The cells of `row` in columns `names`, heavy ones read now (`SkipTask`
        "unreadable_image" when the file cannot be read)."""
        out = {n: self.columns[n][row] for n in names if n in self.columns}
        heavy = [n for n in names if n not in self.columns]
        if heavy:
            out.update(self._read_heavy(row, heavy))
        return out

    def _read_heavy(self, row: int, names: list[str]) -> dict[str, Any]:
        raise DataError(f"{self.where} has no column(s) {names}")


def is_heavy(t: Any) -> bool:
    """Whether an Arrow type holds binary data anywhere (bytes, structs or lists of them)."""
    import pyarrow as pa

    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return True
    if str(t) == "binary_view":
        return True
    if pa.types.is_struct(t):
        return any(is_heavy(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_map(t):
        return is_heavy(t.key_type) or is_heavy(t.item_type)
    value_type = getattr(t, "value_type", None)
    return value_type is not None and is_heavy(value_type)


class _ParquetTable(RowTable):
    """Parquet files: light columns in memory, heavy ones one row group at a time."""

    def __init__(self, files: Sequence[Path], root: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        opened = []
        for path in files:
            try:
                opened.append(pq.ParquetFile(path))
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"cannot read parquet file {path}: {e}") from e
        schema = opened[0].schema_arrow
        names = list(schema.names)
        light = [f.name for f in schema if not is_heavy(f.type)]
        columns: dict[str, list[Any]] = {c: [] for c in light}
        self._files = list(files)
        self._groups: list[tuple[int, int, int]] = []  # (first row, file, row group)
        total = 0
        for fi, pf in enumerate(opened):
            missing = [c for c in names if c not in pf.schema_arrow.names]
            if missing:
                raise DataError(f"{files[fi]} lacks column(s) {missing}; it has "
                                f"{pf.schema_arrow.names}")  # fmt: skip
            table = pf.read(columns=light)
            for c in light:
                columns[c].extend(table[c].to_pylist())
            for g in range(pf.num_row_groups):
                self._groups.append((total, fi, g))
                total += pf.metadata.row_group(g).num_rows
        super().__init__(names, columns, total, str(root), [root])
        self._cache: tuple[int, tuple[str, ...], dict[str, list[Any]]] | None = None

    def _locate(self, row: int) -> int:
        lo, hi = 0, len(self._groups) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._groups[mid][0] <= row:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def roots(self, row: int) -> list[Path]:
        parent = self._files[self._groups[self._locate(row)][1]].parent
        return [parent, *(r for r in self._roots if r != parent)]

    def _read_heavy(self, row: int, names: list[str]) -> dict[str, Any]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        g = self._locate(row)
        first, fi, group = self._groups[g]
        key = tuple(names)
        if self._cache is None or self._cache[:2] != (g, key):
            try:
                table = pq.ParquetFile(self._files[fi]).read_row_group(group, columns=names)
            except (pa.ArrowException, OSError) as e:
                raise SkipTask(
                    "unreadable_image", f"row {row}: cannot read {self._files[fi]}: {e}"
                ) from e
            self._cache = (g, key, {c: table[c].to_pylist() for c in names})
        return {c: self._cache[2][c][row - first] for c in names}


class _DatasetTable(RowTable):
    """A `datasets.Dataset`, read as raw Arrow: no column is ever decoded by `datasets`."""

    def __init__(self, data: Any, where: str, roots: Sequence[Path] = ()) -> None:
        self._arrow = data.with_format("arrow")
        schema = self._arrow[:0].schema
        light = [f.name for f in schema if not is_heavy(f.type)]
        columns = self._arrow.select_columns(light)[:].to_pydict() if light else {}
        super().__init__(schema.names, columns, len(data), where, roots)
        self._views: dict[tuple[str, ...], Any] = {}

    def _read_heavy(self, row: int, names: list[str]) -> dict[str, Any]:
        key = tuple(names)
        if key not in self._views:
            self._views[key] = self._arrow.select_columns(names)
        return self._views[key][row].to_pylist()[0]


class _RecordTable(RowTable):
    """Rows read whole from JSON or CSV files (text and image paths)."""

    def __init__(self, files: Sequence[Path], kind: str, root: Path) -> None:
        skips = SkipCounts()
        records: list[dict[str, Any]] = []
        self._file_of: list[int] = []
        for fi, path in enumerate(files):
            rows = _read_json(path, skips) if kind == "json" else _read_csv(path, skips)
            records.extend(rows)
            self._file_of.extend([fi] * len(rows))
        names = list(dict.fromkeys(k for r in records for k in r))
        columns = {n: [r.get(n) for r in records] for n in names}
        super().__init__(names, columns, len(records), str(root), [root])
        self.skips = skips
        self._files = list(files)

    def roots(self, row: int) -> list[Path]:
        parent = self._files[self._file_of[row]].parent
        return [parent, *(r for r in self._roots if r != parent)]


def _read_json(path: Path, skips: SkipCounts) -> list[dict[str, Any]]:
    """JSON Lines, or one JSON array of objects; lines that are not objects are counted."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON: {e}") from e
    else:
        items = []
        for line in text.splitlines():
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError:
                    items.append(None)
    rows = [item for item in items if isinstance(item, dict)]
    if len(rows) < len(items):
        skips.add("malformed_row", len(items) - len(rows))
    return rows


def _read_csv(path: Path, skips: SkipCounts) -> list[dict[str, Any]]:
    """CSV rows as dicts of strings; a line with the wrong number of fields is counted."""
    rows = []
    try:
        with path.open(newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error:
                    skips.add("malformed_row")
                    continue
                if None in row or any(v is None for v in row.values()):
                    skips.add("malformed_row")
                else:
                    rows.append(row)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    return rows


def open_table(source: Any, split: str | None = None, *, download: bool = False) -> RowTable:
    """The rows of `source` (see the module docstring); `DataError` when there are none."""
    if _is_hf_dataset(source):
        return _from_dataset(source, split, "the given dataset")
    if not isinstance(source, str | os.PathLike):
        raise TypeError(
            "path must be a file, folder, glob or hub id, or a datasets.Dataset / "
            f"DatasetDict; got {type(source).__name__}"
        )
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_file():
        return _from_files([path], path.parent)
    if path.is_dir():
        return _from_folder(path, split, str(path))
    if glob.has_magic(text):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
        files = [f for f in files if f.is_file()]
        if not files:
            raise DataError(f"no files match {text}")
        return _from_files(files, Path(os.path.commonpath([f.parent for f in files])))
    if HUB_ID.fullmatch(text):
        try:
            snapshot = hub_snapshot(text, split, download=download)
        except DataError as e:
            raise DataError(f"there is no local path {text}, and {e}") from None
        return _from_folder(snapshot, split, f"{text} ({snapshot})")
    raise DataError(f"dataset path {text} does not exist (nor is it an owner/name hub id)")


def _is_hf_dataset(obj: Any) -> bool:
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(
        obj, datasets.Dataset | datasets.DatasetDict | datasets.IterableDataset
    )


def _from_dataset(data: Any, split: str | None, where: str, roots: Sequence[Path] = ()) -> RowTable:
    import datasets

    if isinstance(data, datasets.DatasetDict):
        if split is None and len(data) == 1:
            split = next(iter(data))
        if split not in data:
            raise DataError(f"{where} has splits {list(data)}; pass split= one of them")
        data, where = data[split], f"{where} split {split!r}"
    if not isinstance(data, datasets.Dataset):
        raise DataError(f"{where} is a {type(data).__name__}; pass a datasets.Dataset")
    return _DatasetTable(data, where, roots)


def _from_folder(root: Path, split: str | None, where: str) -> RowTable:
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        try:
            import datasets
        except ImportError as e:
            raise DataError(f"{root} is a save_to_disk folder; reading it needs `datasets`") from e
        return _from_dataset(datasets.load_from_disk(str(root)), split, where, [root])
    files = split_files(root, split)
    if not files:
        named = f"split {split!r}" if split else "data"
        raise DataError(f"no parquet, JSON Lines or CSV files of {named} under {where}")
    return _from_files(files, root)


def _from_files(files: Sequence[Path], root: Path) -> RowTable:
    kinds = {_kind(f) for f in files}
    if None in kinds or len(kinds) > 1:
        raise DataError(
            f"expected parquet, JSON Lines or CSV files of one kind, got {[f.name for f in files]}"
        )
    kind = kinds.pop()
    if kind == "parquet":
        return _ParquetTable(files, root)
    return _RecordTable(files, str(kind), root)


def _kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return next((kind for kind, suffixes in KINDS if suffix in suffixes), None)


def split_files(root: Path, split: str | None, *, one_split: bool = True) -> list[Path]:
    """The data files of `split` under `root`: the first kind (`KINDS` order) with files
    named as HF names a split's; every file of that kind when `split` is None (then a
    folder holding several splits' shards raises `DataError`, unless not `one_split`)."""
    for _, suffixes in KINDS:
        for suffix in suffixes:
            if split is None:
                files = sorted(p for p in root.rglob(f"*{suffix}") if p.is_file())
                if one_split:
                    _check_one_split(files, root)
            else:
                files = find_split_files(root, split, suffix)
            if files:
                return files
    return []


def _check_one_split(files: list[Path], root: Path) -> None:
    splits = sorted({m["split"] for f in files if (m := _SHARD.match(f.name))})
    if len(splits) > 1:
        raise DataError(f"{root} holds splits {splits}; pass split= one of them")


def hub_snapshot(repo_id: str, split: str | None, *, download: bool = False) -> Path:
    """The newest hub-cache snapshot of dataset `repo_id` with files of `split` (fetched
    first when `download`); a one-line `DataError` saying how to get it otherwise."""
    if download:
        return _download(repo_id, split)
    folder = "datasets--" + repo_id.replace("/", "--")
    found: list[tuple[float, Path]] = []
    for cache in hub_cache_dirs():
        snapshots = cache / folder / "snapshots"
        if snapshots.is_dir():
            found += [(s.stat().st_mtime, s) for s in snapshots.iterdir() if s.is_dir()]
    for _, snapshot in sorted(found, reverse=True):
        if split_files(snapshot, split, one_split=False):
            return snapshot
    named = f" split {split!r}" if split else ""
    searched = ", ".join(str(d) for d in hub_cache_dirs())
    raise DataError(
        f"dataset {repo_id}{named} is not in the Hugging Face hub cache (searched {searched}); "
        f"pass download=True where the network allows, run `huggingface-cli download "
        f"{repo_id} --repo-type dataset`, or give path=<a local copy>"
    )


def _download(repo_id: str, split: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise DataError("download=True needs huggingface_hub (pip install huggingface_hub)") from e
    patterns = None
    if split is not None:
        patterns = [f"*{split}-*", f"*{split}/*", f"*{split}.*", "*.json", "*.md"]
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=patterns))
    except Exception as e:  # network, authentication, missing repo: one line for the user
        message = " ".join(str(e).split())[:300]
        raise DataError(f"could not download dataset {repo_id}: {message}") from e
