"""Images read in place from folders and zip archives, and safe extraction.

- `ImageIndex` maps an image key (the file's base name without extension, e.g. an OSV-5M
  id) to where it lives: a loose file or a member of a zip shard. It lists zip central
  directories only; image bytes are read one at a time, on demand (`load`).
- Every member name is checked: an absolute path, a drive letter or a `..` component is
  refused with `UnsafeArchiveError`, in place and when extracting (`extract_zip`, which
  only writes below its destination).
- A corrupt or unreadable image raises `DataError` naming the image and its file.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")


class DataError(Exception):
    """A dataset file is missing, corrupt, or not in the expected layout."""


class UnsafeArchiveError(DataError):
    """An archive member would escape its destination (absolute path or `..`)."""


def check_member_name(name: str) -> PurePosixPath:
    """The member's relative path, or `UnsafeArchiveError` if it is absolute or uses `..`."""
    normalized = name.replace("\\", "/")
    path = PurePosixPath(normalized)
    if (
        not normalized
        or normalized.startswith("/")
        or (len(normalized) > 1 and normalized[1] == ":")
        or any(part == ".." for part in path.parts)
        or "\x00" in normalized
    ):
        raise UnsafeArchiveError(f"refusing archive member {name!r}: absolute or escaping path")
    return path


def extract_zip(archive: str | os.PathLike[str], destination: str | os.PathLike[str]) -> Path:
    """Extract a zip below `destination`, refusing any member that would land outside it.

    Every member is checked before anything is written. Returns the destination.
    """
    dest = Path(destination).resolve()
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for info in members:
            target = (dest / check_member_name(info.filename)).resolve()
            if target != dest and dest not in target.parents:
                raise UnsafeArchiveError(f"refusing archive member {info.filename!r}")
        dest.mkdir(parents=True, exist_ok=True)
        for info in members:
            zf.extract(info, dest)
    return dest


@dataclass(frozen=True)
class ImageLocation:
    """Where one image lives: a file, or `member` inside the zip `path`."""

    path: Path
    member: str | None = None

    def describe(self) -> str:
        return f"{self.path}:{self.member}" if self.member else str(self.path)


class ImageIndex:
    """Image key -> location over folders and zip shards (see the module docstring).

    max_open: zip files kept open at once (least recently used closed first).
    """

    def __init__(self, roots: Iterable[str | os.PathLike[str]], max_open: int = 8) -> None:
        self.locations: dict[str, ImageLocation] = {}
        self.duplicates = 0
        self._open: OrderedDict[Path, zipfile.ZipFile] = OrderedDict()
        self._max_open = max_open
        for root in roots:
            self._scan(Path(root))

    def _add(self, key: str, location: ImageLocation) -> None:
        if key in self.locations:
            self.duplicates += 1
            return
        self.locations[key] = location

    def _scan(self, root: Path) -> None:
        if root.is_file():
            files = [root]
        elif root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file())
        else:
            return
        for path in files:
            suffix = path.suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                self._add(path.stem, ImageLocation(path))
            elif suffix == ".zip":
                try:
                    with zipfile.ZipFile(path) as zf:
                        names = zf.namelist()
                except (zipfile.BadZipFile, OSError) as e:
                    raise DataError(f"cannot read zip archive {path}: {e}") from e
                for name in names:
                    member = check_member_name(name)
                    if member.suffix.lower() in IMAGE_SUFFIXES:
                        self._add(member.stem, ImageLocation(path, name))

    def __len__(self) -> int:
        return len(self.locations)

    def __contains__(self, key: object) -> bool:
        return key in self.locations

    def read_bytes(self, key: str) -> bytes:
        location = self.locations.get(key)
        if location is None:
            raise DataError(f"no image named {key!r} in the image folders or archives")
        try:
            if location.member is None:
                return location.path.read_bytes()
            return self._zip(location.path).read(location.member)
        except (OSError, zipfile.BadZipFile, KeyError) as e:
            raise DataError(f"cannot read image {key!r} from {location.describe()}: {e}") from e

    def _zip(self, path: Path) -> zipfile.ZipFile:
        zf = self._open.pop(path, None)
        if zf is None:
            zf = zipfile.ZipFile(path)
            while len(self._open) >= self._max_open:
                self._open.popitem(last=False)[1].close()
        self._open[path] = zf
        return zf

    def load(self, key: str, max_side: int | None = None) -> Image.Image:
        """Decode image `key` to RGB, downscaled so its longer side is <= `max_side`."""
        data = self.read_bytes(key)
        return decode_image(data, f"{key!r} ({self.locations[key].describe()})", max_side)

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()


def decode_image(data: bytes, what: str, max_side: int | None = None) -> Image.Image:
    """Decode image bytes to an RGB PIL image; `DataError` naming `what` when corrupt."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        image = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"image {what} is corrupt or unreadable: {e}") from e
    if max_side is not None and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return image
