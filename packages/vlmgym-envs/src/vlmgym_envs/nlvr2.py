"""`nlvr2`: two images and a statement; is the statement true?

Data: the `HuggingFaceM4/NLVR2` layout (DATA.md): columns `identifier`, `sentence`,
`left_image`, `right_image` (HF Image structs), `label` (0 = "True", 1 = "False"),
`directory`. Read from parquet files under `data_dir` (`tables.find_split_files`), from a
`datasets.save_to_disk` folder (needs the `datasets` library), or, without `data_dir`, from
the dataset's parquet files in the Hugging Face hub cache.

Rows with a label other than 0 / 1 ("bad_label") or an empty sentence ("no_sentence") are
skipped while loading; an image that cannot be shown (corrupt, too large... within
`ImageLimits`) raises `SkipTask` on `reset`. Both are counted and reported by
`env.skipped()`.

Reward: 1.0 when the answer read (`answers.parse_bool`: true/false/yes/no) equals the label,
else 0.0. An ambiguous answer (both polarities) scores 0, sets `info["ambiguous"]` and is
counted in `NLVR2Env.ambiguous_count`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlmgym_envs.answers import parse_bool
from vlmgym_envs.core import Env, Observation, StepResult, system_message, user_message
from vlmgym_envs.data.errors import DataError, SkipCounts, require_dir
from vlmgym_envs.data.hub import hub_cache_dirs
from vlmgym_envs.data.images import (
    DEFAULT_MAX_DECODED_PIXELS,
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageLimits,
)
from vlmgym_envs.data.tables import (
    ParquetRows,
    find_split_files,
    image_cell,
    load_from_disk_rows,
)

HUB_REPO = "HuggingFaceM4/NLVR2"
TEXT_COLUMNS: tuple[str, ...] = ("identifier", "sentence", "label")
IMAGE_COLUMNS: tuple[str, ...] = ("left_image", "right_image")
LABEL_NAMES: tuple[str, ...] = ("True", "False")  # the ClassLabel names: 0 means True

NLVR2_PROMPT = (
    "The first image is the left image and the second is the right image.\n"
    'Statement: "{sentence}"\n'
    "Is the statement true or false for this pair of images? Answer with one word: true or "
    "false."
)


def _hub_parquet_root(split: str) -> Path:
    folder = "datasets--" + HUB_REPO.replace("/", "--")
    for cache in hub_cache_dirs():
        snapshots = cache / folder / "snapshots"
        if snapshots.is_dir():
            for snapshot in sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime)[::-1]:
                if find_split_files(snapshot, split):
                    return snapshot
    raise DataError(
        f"no data_dir given and no parquet files of {HUB_REPO} split {split!r} in the hub "
        f"cache ({', '.join(str(d) for d in hub_cache_dirs())})"
    )


class _DatasetRows:
    """A `datasets.Dataset` seen through the `ParquetRows` interface: its image columns are
    read undecoded (`{"bytes", "path"}`) and decoded here, within the limits."""

    def __init__(self, data: Any) -> None:
        import datasets

        missing = [c for c in [*TEXT_COLUMNS, *IMAGE_COLUMNS] if c not in data.column_names]
        if missing:
            raise DataError(f"dataset lacks column(s) {missing}")
        for c in IMAGE_COLUMNS:
            data = data.cast_column(c, datasets.Image(decode=False))
        self.data = data
        self.columns = {c: list(data[c]) for c in TEXT_COLUMNS}
        self.num_rows = len(data)

    def images(self, row: int, limits: ImageLimits | None = None) -> list[Image.Image]:
        record = self.data[row]
        return [image_cell(record[c], f"row {row} column {c!r}", limits) for c in IMAGE_COLUMNS]


@dataclass(frozen=True)
class NLVR2State:
    idx: int
    identifier: str
    sentence: str
    label: bool  # the truth of the statement


class NLVR2Env(Env[NLVR2State]):
    """NLVR2 (see the module docstring).

    max_image_side, max_image_pixels, max_decoded_pixels, max_image_bytes: the image limits
        (`data.images.ImageLimits`).
    max_rows: use the first this many usable rows.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        split: str = "validation",
        *,
        max_image_side: int | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        max_decoded_pixels: int = DEFAULT_MAX_DECODED_PIXELS,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        max_rows: int | None = None,
        system_prompt: str | None = None,
    ) -> None:
        self.image_limits = ImageLimits(
            max_image_pixels=max_image_pixels,
            max_side=max_image_side,
            max_decoded_pixels=max_decoded_pixels,
            max_image_bytes=max_image_bytes,
        )
        if data_dir is not None:
            root = require_dir(data_dir, "NLVR2 data_dir")
        else:
            root = _hub_parquet_root(split)
        if (root / "dataset_info.json").exists() or (root / "dataset_dict.json").exists():
            self.rows: ParquetRows | _DatasetRows = _DatasetRows(load_from_disk_rows(root, split))
        else:
            files = find_split_files(root, split)
            if not files:
                raise DataError(f"no parquet files for split {split!r} under {root}")
            self.rows = ParquetRows(files, TEXT_COLUMNS, IMAGE_COLUMNS)
        self.skips = SkipCounts()
        self.index: list[int] = []
        sentences = self.rows.columns["sentence"]
        for i, label in enumerate(self.rows.columns["label"]):
            if max_rows is not None and len(self.index) >= max_rows:
                break
            if isinstance(label, bool) or label not in (0, 1):
                self.skips.add("bad_label")
            elif not isinstance(sentences[i], str) or not sentences[i].strip():
                self.skips.add("no_sentence")
            else:
                self.index.append(i)
        if not self.index:
            raise DataError(f"split {split!r} under {root} has no usable rows ({dict(self.skips)})")
        self.system_prompt = system_prompt
        self.ambiguous_count = 0

    def __len__(self) -> int:
        return len(self.index)

    def skipped(self) -> dict[str, int]:
        """Rows left out while loading and images `reset` could not show, per reason."""
        return dict(self.skips)

    def reset(self, idx: int) -> tuple[NLVR2State, Observation]:
        i = self.check_index(idx)
        row = self.index[i]
        columns = self.rows.columns
        sentence = columns["sentence"][row]
        state = NLVR2State(i, str(columns["identifier"][row]), sentence, columns["label"][row] == 0)
        with self.skips.counting():
            images = self.rows.images(row, self.image_limits)
        messages = [user_message(NLVR2_PROMPT.format(sentence=sentence), images)]
        if self.system_prompt:
            messages.insert(0, system_message(self.system_prompt))
        return state, Observation(messages)

    def metrics(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """accuracy, and counts of unparseable and ambiguous answers."""
        return {
            "accuracy": float(np.mean([bool(r["info"].get("correct")) for r in records])),
            "unparseable": float(sum(r["info"].get("answer") is None for r in records)),
            "ambiguous": float(sum(bool(r["info"].get("ambiguous")) for r in records)),
        }

    def step(self, state: NLVR2State, text: str) -> StepResult[NLVR2State]:
        answer = parse_bool(text)
        if answer.ambiguous:
            self.ambiguous_count += 1
        correct = answer.value is not None and answer.value == state.label
        info: dict[str, Any] = {
            "answer": answer.value,
            "label": state.label,
            "correct": correct,
            "ambiguous": answer.ambiguous,
        }
        if answer.reason:
            info["parse_error"] = answer.reason
        return StepResult(reward=float(correct), done=True, info=info)
