"""`caption` (alias `vision`): describe an image; scored against reference captions.

Data, either:
- COCO-style JSON (`annotations=<captions_*.json>`, `image_dir=<folder>`): `images:
  [{id, file_name}]`, `annotations: [{image_id, caption}]`, several captions per image.
  Images without a caption or without a file are skipped and counted in `skipped`;
  a `file_name` that is absolute or uses `..` is refused (`UnsafeArchiveError`).
- parquet files (`data_dir=<folder>`, `split`) with an image column (HF Image struct) and a
  captions column (list of strings, or one string).

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
from vlmgym_envs.data.archives import DataError, check_member_name, decode_image
from vlmgym_envs.data.tables import ParquetRows, find_split_files

CAPTION_PROMPT = "Describe this image in one sentence."
IMAGE_COLUMN_NAMES: tuple[str, ...] = ("image", "img", "jpg")
CAPTION_COLUMN_NAMES: tuple[str, ...] = ("captions", "caption", "sentences", "text", "answer")


def read_coco_captions(
    annotations: str | os.PathLike[str], image_dir: str | os.PathLike[str]
) -> tuple[list[tuple[Path, list[str]]], dict[str, int]]:
    """(image path, captions) per usable image of a COCO captions file, and skip counts."""
    path = Path(annotations)
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
    captions: dict[Any, list[str]] = {}
    for ann in data["annotations"]:
        if isinstance(ann, dict) and isinstance(ann.get("caption"), str) and ann["caption"].strip():
            captions.setdefault(ann.get("image_id"), []).append(ann["caption"].strip())
    root = Path(image_dir)
    items: list[tuple[Path, list[str]]] = []
    skipped: dict[str, int] = {}
    for image in data["images"]:
        if not isinstance(image, dict) or not isinstance(image.get("file_name"), str):
            skipped["bad image entry"] = skipped.get("bad image entry", 0) + 1
            continue
        refs = captions.get(image.get("id"))
        file = root / check_member_name(image["file_name"])
        if not refs:
            skipped["no caption"] = skipped.get("no caption", 0) + 1
        elif not file.is_file():
            skipped["missing image"] = skipped.get("missing image", 0) + 1
        else:
            items.append((file, refs))
    return items, skipped


def _pick(names: Sequence[str], candidates: Sequence[str], given: str | None, what: str) -> str:
    if given is not None:
        if given not in names:
            raise DataError(f"no {what} column {given!r}; columns: {list(names)}")
        return given
    for c in candidates:
        if c in names:
            return c
    raise DataError(f"no {what} column (tried {list(candidates)}); columns: {list(names)}")


@dataclass(frozen=True)
class CaptionState:
    idx: int
    references: tuple[str, ...]


class CaptionEnv(Env[CaptionState]):
    """Image captioning (see the module docstring)."""

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
        system_prompt: str | None = None,
    ) -> None:
        if reward not in ("cider", "keyword"):
            raise ValueError(f"reward must be 'cider' or 'keyword', got {reward!r}")
        self.skipped: dict[str, int] = {}
        self._files: list[Path] | None = None
        self._rows: ParquetRows | None = None
        if annotations is not None:
            if image_dir is None:
                raise ValueError("COCO captions need image_dir (the folder of file_name)")
            items, self.skipped = read_coco_captions(annotations, image_dir)
            self._files = [file for file, _ in items]
            self.references: list[tuple[str, ...]] = [tuple(refs) for _, refs in items]
        elif data_dir is not None:
            files = find_split_files(data_dir, split)
            if not files:
                raise DataError(f"no parquet files for split {split!r} under {data_dir}")
            import pyarrow.parquet as pq

            names = pq.ParquetFile(files[0]).schema_arrow.names
            image_col = _pick(names, IMAGE_COLUMN_NAMES, image_column, "image")
            caption_col = _pick(names, CAPTION_COLUMN_NAMES, captions_column, "captions")
            self._rows = ParquetRows(files, [caption_col], [image_col])
            self._row_index = []
            self.references = []
            for i, value in enumerate(self._rows.columns[caption_col]):
                refs = [value] if isinstance(value, str) else list(value or [])
                refs = [r.strip() for r in refs if isinstance(r, str) and r.strip()]
                if refs:
                    self._row_index.append(i)
                    self.references.append(tuple(refs))
                else:
                    self.skipped["no caption"] = self.skipped.get("no caption", 0) + 1
        else:
            raise ValueError("give annotations= and image_dir= (COCO) or data_dir= (parquet)")
        if not self.references:
            raise DataError(f"no usable captioned images (skipped: {self.skipped})")
        self.reward_name = reward
        self.prompt = prompt
        self.max_image_side = max_image_side
        self.system_prompt = system_prompt
        self._cider: CiderD | None = None

    def __len__(self) -> int:
        return len(self.references)

    @property
    def cider(self) -> CiderD:
        """The CIDEr-D scorer over this split's references (built on first use)."""
        if self._cider is None:
            self._cider = CiderD(self.references)
        return self._cider

    def image(self, i: int) -> Image.Image:
        if self._files is not None:
            file = self._files[i]
            try:
                data = file.read_bytes()
            except OSError as e:
                raise DataError(f"cannot read image {file}: {e}") from e
            return decode_image(data, str(file), self.max_image_side)
        if self._rows is None:
            raise DataError("caption environment has neither image files nor parquet rows")
        return self._rows.images(self._row_index[i], self.max_image_side)[0]

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
