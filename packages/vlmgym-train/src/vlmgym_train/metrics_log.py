"""Run metrics: one JSON object per step in `run_dir/metrics.jsonl`, optionally W&B, plots.

    logger = MetricsLogger(run_dir, wandb_project="vlm-gym", config=asdict(cfg),
                           resume_step=restored.step if resuming else None)
    logger.log(step, {"reward/mean": 0.4, **loss_metrics, **mean_info(infos)})
    logger.close()
    plot_rewards(run_dir / "metrics.jsonl", run_dir / "reward.png")

Each line is `{"step": int, "time": unix seconds, <metric>: float | int | str | null}`;
non-finite floats are written as null (JSON has no NaN). A line is flushed as soon as it is
written. Resuming from a checkpoint at step k keeps the lines with step <= k and drops the
rest (a killed run may have logged steps after its last checkpoint), so the resumed run's
file has no duplicate steps. Log a step's metrics before saving its checkpoint.

Weights & Biases is optional (`pip install 'vlmgym-train[wandb]'`) and imported only when a
project is given. Without `WANDB_API_KEY` (and no `WANDB_MODE` set) it runs offline; sync
later with `wandb sync run_dir/wandb/offline-run-*`. The W&B run id is kept in
`run_dir/wandb_run_id.txt` so a resumed run continues the same W&B run.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlmgym_train.jsonable import atomic_write_text

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id.txt"


def _scalar(value: Any) -> Any:
    """A JSON-ready Python scalar from a Python, numpy or (0-d) JAX value."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()  # numpy / jax 0-d arrays (a device -> host copy)
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise TypeError(f"metric values must be scalars, got {type(value).__name__}: {value!r}")


def _read_records(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of `path` (a torn last line from a kill is skipped)."""
    records = []
    with path.open() as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


class MetricsLogger:
    """Append per-step metrics to `run_dir/metrics.jsonl` and, optionally, to W&B.

    run_dir: the run directory (created if missing).
    wandb_project, wandb_run_name, wandb_entity: log to W&B when `wandb_project` is set.
    config: the run's config (JSON-serialisable), given to W&B.
    resume_step: None starts a fresh file (an existing metrics.jsonl is replaced); an int k
        keeps the existing lines with step <= k and appends after them.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        wandb_project: str | None = None,
        wandb_run_name: str | None = None,
        wandb_entity: str | None = None,
        config: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        kept: list[dict[str, Any]] = []
        if resume_step is not None and self.path.exists():
            kept = [r for r in _read_records(self.path) if int(r.get("step", -1)) <= resume_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")
        self._wandb_run: Any = None
        if wandb_project is not None:
            self._wandb_run = self._init_wandb(
                wandb_project, wandb_run_name, wandb_entity, config, resume_step is not None
            )

    def _init_wandb(
        self,
        project: str,
        name: str | None,
        entity: str | None,
        config: Mapping[str, Any] | None,
        resuming: bool,
    ) -> Any:
        try:
            import wandb
        except ImportError as e:
            raise ImportError(
                "wandb_project was given but wandb is not installed; install it with "
                "`pip install 'vlmgym-train[wandb]'` (in this workspace: "
                "`uv pip install wandb`), or drop the project to log to metrics.jsonl only"
            ) from e
        mode = os.environ.get("WANDB_MODE") or (
            "online" if os.environ.get("WANDB_API_KEY") else "offline"
        )
        id_file = self.run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resuming and id_file.exists() else None
        run = wandb.init(
            project=project,
            name=name,
            entity=entity,
            config=dict(config) if config is not None else None,
            dir=str(self.run_dir),
            mode=mode,
            id=run_id,
            resume="allow" if run_id else None,
        )
        if getattr(run, "id", None):
            atomic_write_text(id_file, str(run.id) + "\n")
        return run

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Write one line `{"step", "time", **metrics}` (flushed) and send it to W&B.

        Values may be Python, numpy or 0-d JAX scalars (they are fetched to host). Returns
        the record as written.
        """
        record: dict[str, Any] = {"step": int(step), "time": time.time()}
        for name, value in metrics.items():
            if name in ("step", "time"):
                raise ValueError(f"metric name {name!r} is reserved")
            record[name] = _scalar(value)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb_run is not None:
            values = {k: v for k, v in record.items() if k not in ("step", "time")}
            self._wandb_run.log(values, step=int(step))
        return record

    def close(self) -> None:
        """Close the file and finish the W&B run."""
        if not self._file.closed:
            self._file.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mean_info(infos: Sequence[Mapping[str, Any]], prefix: str = "env/") -> dict[str, float]:
    """Average the numeric and bool entries of per-sample env info dicts into metrics.

        out[prefix + key] = mean over the samples whose info has a finite number at key

    Bools count as 0/1; nested dicts are flattened with "/" (`{"geo": {"km": 3}}` ->
    `env/geo/km`); strings, None, NaN and other values are skipped. Keys come out sorted.
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}

    def visit(d: Mapping[str, Any], stem: str) -> None:
        for key, value in d.items():
            name = f"{stem}{key}"
            if isinstance(value, Mapping):
                visit(value, name + "/")
                continue
            if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
                value = value.item()
            if not isinstance(value, bool | int | float):
                continue
            x = float(value)
            if not math.isfinite(x):
                continue
            sums[name] = sums.get(name, 0.0) + x
            counts[name] = counts.get(name, 0) + 1

    for info in infos:
        visit(info, "")
    return {f"{prefix}{k}": sums[k] / counts[k] for k in sorted(sums)}


def _smooth(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard-style smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1.0 - weight) * v
        out.append(avg / (1.0 - weight**i))
    return out


def plot_rewards(
    jsonl_path: str | Path,
    png_path: str | Path,
    key: str = "reward/mean",
    *,
    smoothing: float = 0.9,
    title: str | None = None,
) -> Path:
    """Write a PNG of `key` against step from a metrics.jsonl: raw and smoothed curves.

    The smoothed curve is an exponential moving average with weight `smoothing` in [0, 1)
    (bias-corrected, so it starts at the first value). Uses matplotlib's Agg canvas directly,
    so no display and no pyplot global state are involved. Raises ValueError when no line has
    a number at `key`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    records = _read_records(Path(jsonl_path))
    points = sorted(
        (int(r["step"]), float(r[key]))
        for r in records
        if "step" in r and isinstance(r.get(key), int | float) and not isinstance(r[key], bool)
    )
    if not points:
        raise ValueError(f"no numeric {key!r} in {jsonl_path}")
    steps = [s for s, _ in points]
    values = [v for _, v in points]
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, values, color="tab:blue", alpha=0.35, linewidth=1, label=key)
    ax.plot(
        steps,
        _smooth(values, smoothing),
        color="tab:blue",
        linewidth=2,
        label=f"{key} (EMA {smoothing:g})",
    )
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title or f"{key} over training")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    return png_path
