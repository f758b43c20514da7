"""Images read in place from folders and zip archives, and safe extraction.

- `ImageIndex` maps an image key (the file's base name without extension, e.g. an OSV-5M
  id) to where it lives: a loose file or a member of a zip shard. It lists zip central
  directories only; image bytes are read one at a time, on demand (`load`).
- Every member name is checked: an absolute path, a drive letter or a `..` component is
  refused with `UnsafeArchiveError`, in place and when extracting (`extract_zip`, which
  only writes below its destination).
- Reading is bounded (`ImageLimits`): a member whose header declares more than
  `max_image_bytes` is refused before it is read, and every read stops at that cap, so a
  header that lies cannot allocate more either. An image that cannot be shown raises
  `SkipTask` naming the image and its file (`images.decode_image` for the reasons).
"""

from __future__ import annotations

import lzma
import os
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image

from vlmgym_envs.data.errors import DataError, SkipTask, UnsafeArchiveError
from vlmgym_envs.data.images import ImageLimits, decode_image, read_capped

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")

# A member that cannot be read back: a bad CRC (also what a header lying about the size
# gives), truncated or corrupt compressed data, an unsupported method, encryption.
_MEMBER_ERRORS = (
    zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, NotImplementedError, RuntimeError,
)  # fmt: skip


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

    def read_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        """The bytes of image `key`, at most `max_bytes` (default `ImageLimits`'s);
        `SkipTask` when it is missing, unreadable or larger."""
        limit = ImageLimits().max_image_bytes if max_bytes is None else max_bytes
        location = self.locations.get(key)
        if location is None:
            raise SkipTask("missing_image", f"no image named {key!r} in the image folders")
        if location.member is None:
            return read_image_file(location.path, limit)
        what = f"image {key!r} ({location.describe()})"
        try:
            zf = self._zip(location.path)
            info = zf.getinfo(location.member)
            if info.file_size > limit:
                raise SkipTask(
                    "archive_member_too_large",
                    f"{what} declares {info.file_size} bytes, over max_image_bytes={limit}",
                )
            with zf.open(info) as stream:
                return read_capped(stream, what, limit, "archive_member_too_large")
        except KeyError as e:
            raise SkipTask("missing_image", f"{what} is not in its archive any more") from e
        except _MEMBER_ERRORS as e:
            raise SkipTask("corrupt_image", f"cannot read {what}: {e}") from e
        except OSError as e:
            raise SkipTask("unreadable_image", f"cannot read {what}: {e}") from e

    def _zip(self, path: Path) -> zipfile.ZipFile:
        zf = self._open.pop(path, None)
        if zf is None:
            zf = zipfile.ZipFile(path)
            while len(self._open) >= self._max_open:
                self._open.popitem(last=False)[1].close()
        self._open[path] = zf
        return zf

    def load(self, key: str, limits: ImageLimits | None = None) -> Image.Image:
        """Decode image `key` to RGB within `limits` (`SkipTask` when it cannot be shown)."""
        limits = limits or ImageLimits()
        data = self.read_bytes(key, limits.max_image_bytes)
        return decode_image(data, f"{key!r} ({self.locations[key].describe()})", limits)

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()


def read_image_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of an image file, at most `max_bytes`; `SkipTask` naming it otherwise."""
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise SkipTask(
                    "image_file_too_large",
                    f"image {path} is {size} bytes, over max_image_bytes={max_bytes}",
                )
            return read_capped(f, f"image {path}", max_bytes, "image_file_too_large")
    except FileNotFoundError as e:
        raise SkipTask("missing_image", f"image {path} is gone: {e}") from e
    except OSError as e:
        raise SkipTask("unreadable_image", f"cannot read image {path}: {e}") from e
