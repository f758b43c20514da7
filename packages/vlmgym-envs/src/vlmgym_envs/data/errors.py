"""What can go wrong with a dataset, and the counts of what was left out.

- `DataError`: a dataset cannot be used at all (a missing folder or file, a file without a
  required column, no usable rows). It stops the run, with one line naming the file.
- `SkipTask(DataError)`: one item cannot be shown (a corrupt or oversized image, a missing
  archive member...). `Env.reset` raises it; the caller takes another task. `reason` is a
  short key for counting (`SKIP_REASONS` lists the ones the built-in readers use).
- `require_dir`: a folder the user named, or a one-line `DataError` naming it.
- `SkipCounts`: reason -> count of what an environment left out, while loading its table
  (rows) and on `reset` (items); `Env.skipped()` reports it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SKIP_REASONS: dict[str, str] = {
    # items (raised by `reset` as `SkipTask`)
    "corrupt_image": "not an image, truncated, or failing to decode",
    "image_too_large": "more pixels declared than `max_decoded_pixels`",
    "bad_aspect_ratio": "longer side over `max_aspect_ratio` times the shorter one",
    "missing_image": "the image file or bytes are gone",
    "archive_member_too_large": "a zip member over `max_image_bytes`",
    "image_file_too_large": "an image file over `max_image_bytes`",
    "unreadable_image": "an OS error while reading the image",
    # rows (dropped while loading a table)
    "bad_coordinates": "latitude or longitude not a finite number in range",
    "malformed_row": "a CSV line with the wrong number of fields",
    "bad_label": "a label outside the dataset's classes",
    "no_sentence": "an empty statement",
    "no_caption": "no usable reference caption",
    "bad_image_entry": "a COCO image entry without a file name",
    "bad_annotation": "a COCO annotation without a caption string",
}
"""The reasons the built-in readers use, and what each means (others may add their own)."""


class DataError(Exception):
    """A dataset file is missing, corrupt, or not in the expected layout."""


class UnsafeArchiveError(DataError):
    """An archive member would escape its destination (absolute path or `..`)."""


class SkipTask(DataError):
    """One item (image, row) cannot be shown; take another task.

    reason: a short key such as "corrupt_image" (see `SKIP_REASONS`); the message names the
    item (file, archive member or row).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class SkipCounts(dict[str, int]):
    """reason -> how many items or rows were left out for it (a plain dict otherwise)."""

    def add(self, reason: str, count: int = 1) -> None:
        """Count `count` more of `reason`."""
        self[reason] = self.get(reason, 0) + count

    @contextmanager
    def counting(self) -> Iterator[None]:
        """Count the reason of a `SkipTask` raised inside the block, and let it through."""
        try:
            yield
        except SkipTask as err:
            self.add(err.reason)
            raise


def require_dir(path: str | os.PathLike[str], what: str) -> Path:
    """`path` as a `Path` if it is a folder; else `DataError` naming it as `what`."""
    folder = Path(path)
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise DataError(f"{what} {folder} {state}")
    return folder
