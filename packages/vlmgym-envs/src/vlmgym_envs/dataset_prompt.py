"""How `DatasetEnv` turns one row into what the model sees: the prompt, its images, the
chat messages.

- `PromptTemplate`: a `str.format`-style template over the row's columns
  ("Solve: {problem}"), parsed once. Only plain column names: no positional fields, no
  attribute or index access, no format specs or conversions, so a template can only
  insert a column's text. A cell is written as text (None as "", a list as its items
  joined by ", ", a dict as JSON).
- `row_images`: the images of an image cell, in order. A cell is an HF `Image` struct
  (`{"bytes", "path"}`), raw bytes, a file path (relative to the data file's folder, then
  the dataset's root), a list of any of these, or None / [] / "" (no image).
- `user_content` places the images: before the text (the Qwen convention), or, where the
  text holds `<image>` markers, one image at each marker in order; images beyond the
  markers follow the last one and markers beyond the images are dropped.
- `chat_messages` reads a messages cell in the HF chat format (`role` / `content`, or
  ShareGPT's `from` / `value`): `{"type": "image"}` parts (and `<image>` markers in string
  content) are filled with the row's images in order, by the same rule; trailing assistant
  messages (a reference answer) are dropped.
"""

from __future__ import annotations

import json
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from vlmgym_envs.core import Message
from vlmgym_envs.data.archives import read_image_file
from vlmgym_envs.data.errors import DataError, SkipTask
from vlmgym_envs.data.images import ImageLimits, decode_image

IMAGE_MARKER = "<image>"
_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user",
          "gpt": "assistant", "tool": "tool"}  # fmt: skip


class PromptTemplate:
    """A template over a row's columns (see the module docstring). `fields`: the columns
    it names, in order of first use."""

    def __init__(self, template: str) -> None:
        if not isinstance(template, str):
            raise TypeError(f"prompt must be a string template, got {type(template).__name__}")
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as e:
            raise ValueError(f"prompt template {template!r}: {e} (write {{{{ for a brace)") from e
        self.template = template
        self._pieces: list[tuple[str, str | None]] = []
        for literal, field, spec, conversion in parsed:
            if field is not None:
                _check_field(template, field, spec, conversion)
            self._pieces.append((literal, field))
        self.fields = tuple(dict.fromkeys(f for _, f in self._pieces if f is not None))

    def render(self, row: Mapping[str, Any]) -> str:
        """The template with each field replaced by the row's cell, as text."""
        return "".join(lit + ("" if f is None else cell_text(row[f])) for lit, f in self._pieces)


def _check_field(template: str, field: str, spec: str | None, conversion: str | None) -> None:
    if not field or field.isdigit():
        raise ValueError(
            f"prompt template {template!r}: name a column in each field, like {{problem}}"
        )
    if "." in field or "[" in field:
        raise ValueError(
            f"prompt template {template!r}: field {{{field}}} is not a plain column name "
            "(no attribute or index access)"
        )
    if spec or conversion:
        raise ValueError(
            f"prompt template {template!r}: field {{{field}}} has a format spec or conversion; "
            "only plain {column} fields are allowed"
        )


def cell_text(value: Any) -> str:
    """A cell written as prompt text."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple):
        return ", ".join(cell_text(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def row_images(
    cell: Any, what: str, roots: Sequence[Path], limits: ImageLimits
) -> list[Image.Image]:
    """The decoded images of an image cell (see the module docstring); `SkipTask` naming
    `what` when one cannot be shown."""
    if cell is None or (isinstance(cell, str) and not cell.strip()):
        return []
    if isinstance(cell, list | tuple):
        items = list(cell)
        many = True
    else:
        items, many = [cell], False
    images = []
    for k, item in enumerate(items):
        name = f"{what} image {k}" if many else what
        if item is None:
            raise SkipTask("missing_image", f"{name} is empty")
        images.append(_one_image(item, name, roots, limits))
    return images


def _one_image(item: Any, what: str, roots: Sequence[Path], limits: ImageLimits) -> Image.Image:
    if isinstance(item, dict):
        data, path = item.get("bytes"), item.get("path")
        if isinstance(data, bytes | bytearray) and data:
            return decode_image(bytes(data), what, limits)
        if isinstance(path, str) and path:
            item = path
        else:
            raise SkipTask("missing_image", f"{what} holds neither image bytes nor a path")
    if isinstance(item, bytes | bytearray):
        if not item:
            raise SkipTask("missing_image", f"{what} holds no image bytes")
        return decode_image(bytes(item), what, limits)
    if isinstance(item, str):
        file = _find_file(item, roots, what)
        data = read_image_file(file, limits.max_image_bytes)
        return decode_image(data, f"{what} ({file})", limits)
    raise SkipTask("missing_image", f"{what} holds a {type(item).__name__}, not an image")


def _find_file(name: str, roots: Sequence[Path], what: str) -> Path:
    name = name.strip()
    if "://" in name:
        raise SkipTask(
            "missing_image", f"{what} is a URL ({name[:100]}); images are read from files"
        )
    path = Path(name).expanduser()
    candidates = [path] if path.is_absolute() else [root / path for root in roots] or [path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise SkipTask("missing_image", f"{what}: image file {name} not found")


def user_content(text: str, images: Sequence[Image.Image], marker: str | None) -> list[dict]:
    """Content parts of one user message: `images` at the `marker`s of `text`, or first."""
    parts = _split_marker(text, marker)
    if not any(part is _SLOT for part in parts):
        parts.insert(0, _SLOT)
    return _place([{"role": "user", "content": parts}], images)[0]["content"]


class _Slot:
    """Where an image goes, before the row's images are known."""


_SLOT = _Slot()


def chat_messages(
    cell: Any, images: Sequence[Image.Image], marker: str | None, what: str
) -> list[Message]:
    """HF chat messages from a messages cell, images filled in (see the module docstring);
    `SkipTask` ("bad_messages") when the cell is not a conversation with a user turn."""
    if isinstance(cell, str):
        try:
            cell = json.loads(cell)
        except json.JSONDecodeError:
            raise SkipTask("bad_messages", f"{what} is a string, not JSON messages") from None
    if not isinstance(cell, list) or not all(isinstance(m, dict) for m in cell):
        raise SkipTask("bad_messages", f"{what} is not a list of chat messages")
    messages = [_message(m, marker, what) for m in cell]
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    users = [m for m in messages if m["role"] == "user"]
    if not users:
        raise SkipTask("bad_messages", f"{what} has no user message")
    if not any(part is _SLOT for m in messages for part in m["content"]):
        users[0]["content"].insert(0, _SLOT)
    return _place(messages, images)


def _place(messages: list[dict[str, Any]], images: Sequence[Image.Image]) -> list[Message]:
    """Fill the slots of `messages` with `images` in order: images beyond the slots follow
    the last slot, slots beyond the images are dropped."""
    total = sum(part is _SLOT for m in messages for part in m["content"])
    seen = 0
    for m in messages:
        content = []
        for part in m["content"]:
            if part is not _SLOT:
                content.append(part)
                continue
            seen += 1
            chunk = images[seen - 1 :] if seen == total else images[seen - 1 : seen]
            content.extend({"type": "image", "image": im} for im in chunk)
        m["content"] = content
    return messages


def _message(m: dict[str, Any], marker: str | None, what: str) -> dict[str, Any]:
    role = _ROLES.get(str(m.get("role") or m.get("from") or "").lower())
    if role is None:
        raise SkipTask("bad_messages", f"{what}: a message has role {m.get('role')!r}")
    content = m.get("content") if "content" in m else m.get("value")
    parts: list[Any] = []
    if isinstance(content, str):
        if role == "user":
            parts = _split_marker(content, marker)
        else:
            parts = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("image", "image_url"):
                parts.append(_SLOT)
            elif kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif isinstance(part, str):
                parts.append({"type": "text", "text": part})
            else:
                raise SkipTask("bad_messages", f"{what}: a content part is {str(part)[:80]}")
    elif content is not None:
        raise SkipTask("bad_messages", f"{what}: a message's content is {type(content).__name__}")
    return {"role": role, "content": parts}


def _split_marker(text: str, marker: str | None) -> list[Any]:
    if not marker or marker not in text:
        return [{"type": "text", "text": text}]
    parts: list[Any] = []
    for k, piece in enumerate(text.split(marker)):
        if k:
            parts.append(_SLOT)
        if piece.strip():
            parts.append({"type": "text", "text": piece})
    return parts


def check_columns(names: Sequence[str], wanted: Mapping[str, str], where: str) -> None:
    """`DataError` naming the first of `wanted` (column -> what it is for) not in `names`."""
    for column, role in wanted.items():
        if column not in names:
            raise DataError(
                f"{where} has no column {column!r} (the {role}); its columns: {list(names)}"
            )
