"""Metrics JSONL (resume without duplicates), optional W&B plumbing, info averaging, plots."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from vlmgym_train import MetricsLogger, mean_info, plot_rewards


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_lines_and_scalar_conversion(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path / "run") as log:
        log.log(1, {"reward/mean": np.float32(0.25), "loss": jnp.float32(1.5), "ok": True})
        log.log(2, {"reward/mean": 0.5, "loss": float("nan"), "n": np.int64(3)})
        # Flushed per line: readable before close.
        assert len(read_lines(tmp_path / "run" / "metrics.jsonl")) == 2
    lines = read_lines(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in lines] == [1, 2]
    assert lines[0]["reward/mean"] == 0.25 and lines[0]["loss"] == 1.5 and lines[0]["ok"] is True
    assert lines[1]["loss"] is None and lines[1]["n"] == 3
    assert all(isinstance(r["time"], float) for r in lines)


def test_rejects_arrays_and_reserved_names(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as log:
        with pytest.raises(TypeError, match="scalars"):
            log.log(1, {"x": np.zeros(3)})
        with pytest.raises(ValueError, match="reserved"):
            log.log(1, {"step": 3})


def test_resume_drops_steps_after_checkpoint(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as log:
        for step in range(1, 6):
            log.log(step, {"reward/mean": step / 10})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "reward/me')  # torn line from a kill mid-write
    with MetricsLogger(tmp_path, resume_step=3) as log:
        assert [r["step"] for r in read_lines(tmp_path / "metrics.jsonl")] == [1, 2, 3]
        for step in range(4, 8):
            log.log(step, {"reward/mean": step / 10})
    steps = [r["step"] for r in read_lines(tmp_path / "metrics.jsonl")]
    assert steps == list(range(1, 8))


def test_fresh_run_starts_a_new_file(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as log:
        log.log(1, {"a": 1.0})
    with MetricsLogger(tmp_path) as log:
        log.log(1, {"a": 2.0})
    assert read_lines(tmp_path / "metrics.jsonl")[0]["a"] == 2.0
    assert len(read_lines(tmp_path / "metrics.jsonl")) == 1


def test_wandb_missing_gives_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ImportError, match=r"vlmgym-train\[wandb\]"):
        MetricsLogger(tmp_path, wandb_project="p")


class FakeRun:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.id = kwargs.get("id") or "run123"
        self.logged: list[tuple[dict[str, Any], int]] = []
        self.finished = False

    def log(self, values: dict[str, Any], step: int) -> None:
        self.logged.append((values, step))

    def finish(self) -> None:
        self.finished = True


def test_wandb_offline_without_key_and_resumes_same_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[FakeRun] = []

    def init(**kwargs: Any) -> FakeRun:
        runs.append(FakeRun(**kwargs))
        return runs[-1]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    log = MetricsLogger(tmp_path, wandb_project="vlm-gym", wandb_run_name="r", config={"lr": 1})
    log.log(1, {"reward/mean": 0.5})
    log.close()
    first = runs[0]
    assert first.kwargs["mode"] == "offline"
    assert first.kwargs["project"] == "vlm-gym" and first.kwargs["config"] == {"lr": 1}
    assert first.logged == [({"reward/mean": 0.5}, 1)] and first.finished
    assert (tmp_path / "wandb_run_id.txt").read_text().strip() == "run123"

    monkeypatch.setenv("WANDB_API_KEY", "x")
    with MetricsLogger(tmp_path, wandb_project="vlm-gym", resume_step=1):
        pass
    assert runs[1].kwargs["mode"] == "online"
    assert runs[1].kwargs["id"] == "run123" and runs[1].kwargs["resume"] == "allow"


def test_mean_info() -> None:
    infos = [
        {"correct": True, "distance_km": 10.0, "answer": "paris", "geo": {"country": 1}},
        {"correct": False, "distance_km": float("nan"), "parse_error": "no answer"},
        {"correct": True, "distance_km": 30, "geo": {"country": 0}, "extra": None},
    ]
    got = mean_info(infos)
    assert got == pytest.approx(
        {"env/correct": 2 / 3, "env/distance_km": 20.0, "env/geo/country": 0.5}
    )
    assert mean_info([]) == {}
    assert list(mean_info(infos, prefix="")) == ["correct", "distance_km", "geo/country"]


def test_plot_rewards_writes_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with MetricsLogger(tmp_path) as log:
        for step in range(1, 41):
            log.log(step, {"reward/mean": min(1.0, step / 40 + rng.normal(0, 0.1)), "x": 1})
        log.log(41, {"x": 2})  # a line without the key is skipped
    png = plot_rewards(tmp_path / "metrics.jsonl", tmp_path / "plots" / "reward.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5_000
    with pytest.raises(ValueError, match="no numeric"):
        plot_rewards(tmp_path / "metrics.jsonl", tmp_path / "y.png", key="missing")
