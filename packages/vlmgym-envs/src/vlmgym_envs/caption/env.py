"""`caption` (alias `vision`): describe an image; scored against reference captions.

Data, either:
- COCO-style JSON (`annotations=<captions_*.json>`, `image_dir=<folder>`): `images:
  [{id, file_name}]`, `annotations: [{image_id, caption}]`, several captions per image.
  Images without a caption ("no_caption") or without a file ("missing_image"), entries
  without a file name ("bad_image_entry") and annotations without a caption string
  ("bad_annotation") are skipped and counted; a `file_name` that is absolute or uses `..`
  is refused (`UnsafeArchiveError`: the whole file is suspect).
- parquet files (`data_dir=<folder>`, `split`) with an image column (HF Image struct) and a
  captions column (list of strings, or one string); rows without one are skipped
  ("no_caption").

Images are read on `reset` within `ImageLimits` (`max_image_pixels`...); one that cannot be
shown raises `SkipTask`. `env.skipped()` reports all these counts.

Reward (`reward=`):
- "cider" (default): CIDEr-D of the caption against the image's references, with document
  frequencies from all the references of the split (`cider.CiderD`); about 0..10 (a
  caption equal to all references of a distinctive image scores high, an empty one 0).
- "keyword": `cider.keyword_reward`, F1 against the words the references agree on, in [0, 1].
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from vlmgym_envs.caption.cider import CiderD, keyword_reward
from vlmgym_envs.core import Env, Observation, StepResult, system_message, user_message
from vlmgym_envs.data.archives import check_member_name, read_image_file
from vlmgym_envs.data.errors import DataError, SkipCounts, require_dir
from vlmgym_envs.data.images import (
    DEFAULT_MAX_DECODED_PIXELS,
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageLimits,
    decode_image,
)
from vlmgym_envs.data.tables import ParquetRows, find_split_files

CAPTION_PROMPT = "Describe this image in one sentence."
IMAGE_COLUMN_NAMES: tuple[str, ...] = ("image", "img", "jpg")
CAPTION_COLUMN_NAMES: tuple[str, ...] = ("captions", "caption", "sentences", "text", "answer")


def read_coco_captions(
    annotations: str | os.PathLike[str], image_dir: str | os.PathLike[str]
) -> tuple[list[tuple[Path, list[str]]], SkipCounts]:
    """(image path, captions) per usable image of a COCO captions file, and skip counts."""
    path = Path(annotations)
    root = require_dir(image_dir, "caption image_dir")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read COCO captions {path}: {e}") from e
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise DataError(f"{path} is not a COCO captions file (needs 'images' and 'annotations')")
    skips = SkipCounts()
    captions: dict[Any, list[str]] = {}
    for ann in data["annotations"]:
        if isinstance(ann, dict) and isinstance(ann.get("caption"), str) and ann["caption"].strip():
            image_id = ann.get("image_id")
            if isinstance(image_id, int | str):
                captions.setdefault(image_id, []).append(ann["caption"].strip())
                continue
        skips.add("bad_annotation")
    items: list[tuple[Path, list[str]]] = []
    for image in data["images"]:
        if not isinstance(image, dict) or not isinstance(image.get("file_name"), str):
            skips.add("bad_image_entry")
            continue
        image_id = image.get("id")
        refs = captions.get(image_id) if isinstance(image_id, int | str) else None
        file = root / check_member_name(image["file_name"])
        if not refs:
            skips.add("no_caption")
        elif not file.is_file():
            skips.add("missing_image")
        else:
            items.append((file, refs))
    return items, skips


def _pick(names: Sequence[str], candidates: Sequence[str], given: str | None, what: str) -> str:
    if given is not None:
        if given not in names:
            raise DataError(f"no {what} column {given!r}; columns: {list(names)}")
        return given
    for c in candidates:
        if c in names:
            return c
    raise DataError(f"no {what} column (tried {list(candidates)}); columns: {list(names)}")


def reference_captions(value: Any) -> tuple[str, ...]:
    """The non-empty caption strings of a captions cell (one string or a list of them)."""
    if isinstance(value, str):
        value = [value]
    elif not isinstance(value, list | tuple):
        return ()
    return tuple(r.strip() for r in value if isinstance(r, str) and r.strip())


@dataclass(frozen=True)
class CaptionState:
    idx: int
    references: tuple[str, ...]


class CaptionEnv(Env[CaptionState]):
    """Image captioning (see the module docstring).

    max_image_side, max_image_pixels, max_decoded_pixels, max_image_bytes: the image limits
        (`data.images.ImageLimits`).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        split: str = "validation",
        *,
        annotations: str | os.PathLike[str] | None = None,
        image_dir: str | os.PathLike[str] | None = None,
        image_column: str | None = None,
        captions_column: str | None = None,
        reward: Literal["cider", "keyword"] = "cider",
        prompt: str = CAPTION_PROMPT,
        max_image_side: int | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        max_decoded_pixels: int = DEFAULT_MAX_DECODED_PIXELS,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        system_prompt: str | None = None,
    ) -> None:
        if reward not in ("cider", "keyword"):
            raise ValueError(f"reward must be 'cider' or 'keyword', got {reward!r}")
        self.image_limits = ImageLimits(
            max_image_pixels=max_image_pixels,
            max_side=max_image_side,
            max_decoded_pixels=max_decoded_pixels,
            max_image_bytes=max_image_bytes,
        )
        self.skips = SkipCounts()
        self._files: list[Path] | None = None
        self._rows: ParquetRows | None = None
        if annotations is not None:
            if image_dir is None:
                raise ValueError("COCO captions need image_dir (the folder of file_name)")
            items, self.skips = read_coco_captions(annotations, image_dir)
            self._files = [file for file, _ in items]
            self.references: list[tuple[str, ...]] = [tuple(refs) for _, refs in items]
        elif data_dir is not None:
            self._read_parquet(data_dir, split, image_column, captions_column)
        else:
            raise ValueError("give annotations= and image_dir= (COCO) or data_dir= (parquet)")
        if not self.references:
            raise DataError(f"no usable captioned images (skipped: {dict(self.skips)})")
        self.reward_name = reward
        self.prompt = prompt
        self.system_prompt = system_prompt
        self._cider: CiderD | None = None

    def _read_parquet(
        self,
        data_dir: str | os.PathLike[str],
        split: str,
        image_column: str | None,
        captions_column: str | None,
    ) -> None:
        import pyarrow.parquet as pq

        files = find_split_files(require_dir(data_dir, "caption data_dir"), split)
        if not files:
            raise DataError(f"no parquet files for split {split!r} under {data_dir}")
        names = pq.ParquetFile(files[0]).schema_arrow.names
        image_col = _pick(names, IMAGE_COLUMN_NAMES, image_column, "image")
        caption_col = _pick(names, CAPTION_COLUMN_NAMES, captions_column, "captions")
        self._rows = ParquetRows(files, [caption_col], [image_col])
        self._row_index: list[int] = []
        self.references = []
        for i, value in enumerate(self._rows.columns[caption_col]):
            refs = reference_captions(value)
            if refs:
                self._row_index.append(i)
                self.references.append(refs)
            else:
                self.skips.add("no_caption")

    def __len__(self) -> int:
        return len(self.references)

    def skipped(self) -> dict[str, int]:
        """Rows or images left out while loading and images `reset` could not show."""
        return dict(self.skips)

    @property
    def cider(self) -> CiderD:
        """The CIDEr-D scorer over this split's references (built on first use)."""
        if self._cider is None:
            self._cider = CiderD(self.references)
        return self._cider

    def image(self, i: int) -> Image.Image:
        """The RGB image of task `i`, read now within the limits; `SkipTask` (counted)
        when it cannot be shown."""
        with self.skips.counting():
            if self._files is not None:
                file = self._files[i]
                data = read_image_file(file, self.image_limits.max_image_bytes)
                return decode_image(data, str(file), self.image_limits)
            if self._rows is None:
                raise DataError("caption environment has neither image files nor parquet rows")
            return self._rows.images(self._row_index[i], self.image_limits)[0]

    def reset(self, idx: int) -> tuple[CaptionState, Observation]:
        i = self.check_index(idx)
        messages = [user_message(self.prompt, [self.image(i)])]
        if self.system_prompt:
            messages.insert(0, system_message(self.system_prompt))
        return CaptionState(i, self.references[i]), Observation(messages)

    def metrics(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """The mean reward under its own name (`cider_d`, or the keyword reward's kind)."""
        kind = records[0]["info"].get("reward_kind", "cider") if records else "cider"
        name = "cider_d" if kind == "cider" else kind
        return {name: float(np.mean([r["reward"] for r in records]))}

    def step(self, state: CaptionState, text: str) -> StepResult[CaptionState]:
        if self.reward_name == "cider":
            reward = self.cider.score(text, state.references)
        else:
            reward = keyword_reward(text, state.references)
        info = {"reward_kind": self.reward_name, "num_references": len(state.references)}
        return StepResult(reward=float(reward), done=True, info=info)
