"""One JSON-safe conversion for everything vlm-gym writes as JSON (checkpoint metadata,
evaluation records, rollouts sent between hosts), and the atomic text write it goes
through."""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def jsonable(x: Any, *, nan_to_null: bool = True) -> Any:
    """`x` as plain JSON values: dataclasses and mappings become dicts (string keys), lists,
    tuples and numpy arrays lists, numpy scalars Python scalars, anything else its `str`.

    Non-finite floats become None (JSON has no NaN) unless `nan_to_null=False`, which keeps
    them for Python's `json` module to round-trip (as `NaN` / `Infinity`).
    """
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        x = {f.name: getattr(x, f.name) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): jsonable(v, nan_to_null=nan_to_null) for k, v in x.items()}
    if isinstance(x, list | tuple | np.ndarray):
        return [jsonable(v, nan_to_null=nan_to_null) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and nan_to_null and not math.isfinite(x):
        return None
    if x is None or isinstance(x, str | int | float | bool):
        return x
    return str(x)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` to `path` so a reader sees the old file or the new one, never a part:
    a temporary sibling is written, fsynced and renamed over `path`. A failure (a full
    disk) leaves the old file and no temporary behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
