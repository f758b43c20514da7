"""OSV-5M read from disk: the split's CSV and its images (`OSV5MDataset`).

Data (DATA.md): `<data_dir>/{train,test}.csv` and images named `<id>.jpg`, in zip shards
`<data_dir>/images/<split>/NN.zip` (any folder inside the zip) or extracted anywhere under
`<data_dir>/images/<split>/`. Without `data_dir`, the newest snapshot of `osv5m/osv5m` in
the Hugging Face hub cache is used (`HF_HUB_CACHE`, `HF_HOME/hub` or
`~/.cache/huggingface/hub`); `download=True` fetches the split there first, when the
network allows and huggingface_hub is installed.

The CSV is read once (only the columns used); images are read one at a time, within
`ImageLimits`. Rows without an image ("missing_image"), with a latitude or longitude that is
not a finite number in range ("bad_coordinates") or with the wrong number of fields
("malformed_row") are skipped (or, without an image and with `on_missing_image="error"`,
raise); an image that cannot be shown raises `SkipTask`. Both are counted in `skips`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from vlmgym_envs.data.archives import ImageIndex
from vlmgym_envs.data.errors import DataError, SkipCounts, require_dir
from vlmgym_envs.data.hub import find_hub_snapshot, hub_cache_dirs
from vlmgym_envs.data.images import ImageLimits
from vlmgym_envs.geoguessr.reward import GeoTruth

HUB_REPO = "osv5m/osv5m"
REQUIRED_COLUMNS: tuple[str, ...] = (
    "id", "latitude", "longitude", "country", "region", "sub-region", "city",
)  # fmt: skip


def resolve_data_dir(data_dir: str | os.PathLike[str] | None, split: str, download: bool) -> Path:
    """`data_dir`, or the hub cache snapshot of OSV-5M (downloaded first if asked)."""
    if data_dir is not None:
        return require_dir(data_dir, "OSV-5M data_dir")
    if download:
        try:
            from huggingface_hub import snapshot_download
        except ImportError as e:
            raise DataError(
                "download=True needs huggingface_hub (pip install huggingface_hub)"
            ) from e
        return Path(
            snapshot_download(
                HUB_REPO,
                repo_type="dataset",
                allow_patterns=[f"{split}.csv", f"images/{split}/*"],
            )
        )
    snapshot = find_hub_snapshot(HUB_REPO, f"{split}.csv")
    if snapshot is None:
        searched = ", ".join(str(d) for d in hub_cache_dirs())
        raise DataError(
            f"no data_dir given and no OSV-5M snapshot with {split}.csv in the hub cache "
            f"(searched {searched}); pass data_dir=<folder with {split}.csv and images/>"
        )
    return snapshot


@dataclass(frozen=True)
class OSV5MRecord:
    """One labelled image of OSV-5M."""

    id: str
    truth: GeoTruth


def _read_split_csv(csv_path: Path, skips: SkipCounts) -> dict[str, list[str]]:
    """REQUIRED_COLUMNS of a split's CSV as lists of strings (invalid UTF-8 replaced); a line
    with the wrong number of fields is skipped and counted ("malformed_row"). DataError
    names the file when it is missing, unreadable or lacks a column."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    if not csv_path.is_file():
        raise DataError(f"OSV-5M split file not found: {csv_path}")
    try:
        header = _csv_header(csv_path)
    except OSError as e:
        raise DataError(f"cannot read {csv_path}: {e}") from e
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DataError(f"{csv_path} lacks column(s) {missing}; it has {header}")
    malformed: list[int] = []  # list.append is atomic: the reader calls this from threads

    def on_invalid_row(row: Any) -> str:
        malformed.append(row.number)
        return "skip"

    try:
        table = pacsv.read_csv(
            csv_path,
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid_row),
            convert_options=pacsv.ConvertOptions(
                include_columns=list(REQUIRED_COLUMNS),
                column_types=dict.fromkeys(REQUIRED_COLUMNS, pa.binary()),
                strings_can_be_null=False,
            ),
        )
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"cannot read {csv_path}: {e}") from e
    if malformed:
        skips.add("malformed_row", len(malformed))
    return {
        c: [b.decode("utf-8", errors="replace") for b in table[c].to_pylist()]
        for c in REQUIRED_COLUMNS
    }


def parse_coordinates(latitude: str, longitude: str) -> tuple[float, float] | None:
    """(latitude, longitude) as floats, or None unless both are finite and in range."""
    try:
        lat, lon = float(latitude), float(longitude)
    except ValueError:
        return None
    if not (math.isfinite(lat) and math.isfinite(lon)) or abs(lat) > 90 or abs(lon) > 180:
        return None
    return lat, lon


class OSV5MDataset:
    """OSV-5M rows with an image and finite coordinates, in CSV order.

    skips: reason -> count of rows left out while loading ("missing_image",
    "bad_coordinates", "malformed_row") and of images `image` could not show
    ("corrupt_image"..., see `data.errors.SKIP_REASONS`).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        split: str = "test",
        *,
        image_dir: str | os.PathLike[str] | None = None,
        max_rows: int | None = None,
        on_missing_image: Literal["skip", "error"] = "skip",
        download: bool = False,
    ) -> None:
        if on_missing_image not in ("skip", "error"):
            raise ValueError(f"on_missing_image must be 'skip' or 'error': {on_missing_image!r}")
        root = resolve_data_dir(data_dir, split, download)
        csv_path = root / f"{split}.csv"
        self.skips = SkipCounts()
        columns = _read_split_csv(csv_path, self.skips)
        if max_rows is not None:
            columns = {c: values[:max_rows] for c, values in columns.items()}
        if not columns["id"]:
            raise DataError(f"{csv_path} has no rows")

        images_root = Path(image_dir) if image_dir is not None else root / "images" / split
        if not images_root.exists():
            raise DataError(f"OSV-5M image folder not found: {images_root}")
        self.images = ImageIndex([images_root])
        self.split = split
        self.csv_path = csv_path
        self.records: list[OSV5MRecord] = []
        for i, raw_id in enumerate(columns["id"]):
            image_id = raw_id.strip()
            coordinates = parse_coordinates(columns["latitude"][i], columns["longitude"][i])
            if coordinates is None:
                self.skips.add("bad_coordinates")
                continue
            if image_id not in self.images:
                if on_missing_image == "error":
                    raise DataError(f"no image for OSV-5M id {image_id} under {images_root}")
                self.skips.add("missing_image")
                continue
            truth = GeoTruth(
                latitude=coordinates[0],
                longitude=coordinates[1],
                country=columns["country"][i].strip().upper(),
                region=columns["region"][i].strip(),
                sub_region=columns["sub-region"][i].strip(),
                city=columns["city"][i].strip(),
            )
            self.records.append(OSV5MRecord(image_id, truth))
        if not self.records:
            raise DataError(
                f"no usable rows in {csv_path} (skipped: {dict(self.skips)}); check the "
                f"images under {images_root}"
            )

    def __len__(self) -> int:
        return len(self.records)

    def image(self, i: int, limits: ImageLimits | None = None) -> Image.Image:
        """The RGB image of record `i`, read now within `limits`; `SkipTask` (counted in
        `skips`) when it cannot be shown."""
        with self.skips.counting():
            return self.images.load(self.records[i].id, limits)


def _csv_header(path: Path) -> list[str]:
    import csv

    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        return next(csv.reader(f), [])
