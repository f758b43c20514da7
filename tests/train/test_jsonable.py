"""`vlmgym_train.jsonable`: the one JSON-safe conversion (checkpoint metadata, eval records,
rollouts between hosts)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
from vlmgym_train.jsonable import jsonable


@dataclasses.dataclass
class Inner:
    km: float
    where: tuple[float, float]


@dataclasses.dataclass
class Outer:
    name: str
    inner: Inner
    counts: np.ndarray


def test_nested_values_become_plain_json():
    x = {
        1: Outer("a", Inner(np.float32(2.5), (1.0, np.float64(2.0))), np.arange(3)),
        "flags": [np.bool_(True), None, Path("/tmp/x")],
        "bad": float("nan"),
    }
    out = jsonable(x)
    assert out == {
        "1": {"name": "a", "inner": {"km": 2.5, "where": [1.0, 2.0]}, "counts": [0, 1, 2]},
        "flags": [True, None, "/tmp/x"],
        "bad": None,
    }
    assert type(out["1"]["counts"][0]) is int and type(out["flags"][0]) is bool
    json.dumps(out, allow_nan=False)  # strict JSON


def test_non_finite_floats_can_round_trip():
    out = jsonable({"r": [np.float32("nan"), float("inf"), 1.0]}, nan_to_null=False)
    back = json.loads(json.dumps(out))
    assert math.isnan(back["r"][0]) and back["r"][1] == math.inf and back["r"][2] == 1.0
