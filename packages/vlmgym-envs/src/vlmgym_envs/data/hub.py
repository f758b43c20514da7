"""Where Hugging Face's hub keeps downloaded datasets, for environments that find their data
there when no `data_dir` is given."""

from __future__ import annotations

import os
from pathlib import Path


def hub_cache_dirs() -> list[Path]:
    """The Hugging Face hub cache folders to search, in order."""
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return dirs


def find_hub_snapshot(repo_id: str, required: str) -> Path | None:
    """The newest cached snapshot folder of dataset `repo_id` holding `required`, or None."""
    folder = "datasets--" + repo_id.replace("/", "--")
    best: tuple[float, Path] | None = None
    for cache in hub_cache_dirs():
        snapshots = cache / folder / "snapshots"
        if not snapshots.is_dir():
            continue
        for snapshot in snapshots.iterdir():
            if (snapshot / required).exists():
                mtime = snapshot.stat().st_mtime
                if best is None or mtime > best[0]:
                    best = (mtime, snapshot)
    return None if best is None else best[1]
