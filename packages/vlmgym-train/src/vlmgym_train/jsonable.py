"""One JSON-safe conversion for everything vlm-gym writes as JSON (checkpoint metadata,
evaluation records, rollouts sent between hosts)."""

from __future__ import annotations

import dataclasses
import math
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
